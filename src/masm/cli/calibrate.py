"""``masm calibrate``: fit a detector's temperature and operating points on labelled data and store them
with the checkpoint (its weights untouched)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate a checkpoint's scores and choose its operating points on labelled data",
        description=(
            "Fit temperature scaling (one scalar on the log-odds, by NLL) on labelled data, choose the "
            "thresholds of named operating points (default: fpr=0.01, fpr=0.001 where the data have at "
            "least 1,000 reals, and eer; at video level too for video data), and store them in the "
            "checkpoint's config.json: masm detect, masm serve, masm export and masm eval then use them. "
            "Writes OUT/calibration.json, calibration.md, reliability.png and roc-log.png. Use data the "
            "detector was not trained on (a validation split), never the test sets."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/checkpoints/best)")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SPEC",
        help="calibration data spec, repeatable (pooled): dfb:PATH.json@val or folder:DIR",
    )
    parser.add_argument(
        "--point",
        action="append",
        metavar="NAME",
        help="operating point to choose, repeatable: fpr=RATE or eer (default: fpr=0.01, fpr=0.001, eer)",
    )
    parser.add_argument(
        "--default", metavar="NAME", help="the operating point detect and serve use (default: the first)"
    )
    parser.add_argument("--frames", type=int, default=32, help="frames per video, evenly spaced (0: all)")
    parser.add_argument(
        "--data-root",
        help="folder that relative frame paths in a dfb: index resolve against (default: the index's own folder)",
    )
    parser.add_argument("--compression", default="c23", help="FF++-family compression level")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="report folder (default: CHECKPOINT-calibration beside the checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.errors import MasmError
    from masm.evaluation.calibrate import calibrate_checkpoint

    if args.frames < 0 or args.batch_size < 1 or args.workers < 0:
        raise MasmError("--frames >= 0, --batch-size >= 1 and --workers >= 0 please")
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.resolve().with_name(checkpoint.name + "-calibration")
    result = calibrate_checkpoint(
        checkpoint,
        args.data,
        out_dir=out,
        data_root=args.data_root,
        frames=args.frames,
        compression=args.compression,
        points=args.point,
        default=args.default,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    calibration = result["calibration"]
    after = calibration.metrics["after"]
    before = calibration.metrics["before"]
    print(
        f"temperature {calibration.temperature:.4f}; ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
        f"Brier {before['brier']:.4f} -> {after['brier']:.4f} "
        f"({calibration.n_real} real, {calibration.n_fake} fake frames of {calibration.fitted_on})"
    )
    for op in calibration.operating_points:
        mark = " (default)" if op.name == calibration.default else ""
        print(
            f"  {op.name:<10} {op.level:<5} threshold {op.threshold:.6f}  FPR {op.fpr:.4f}  TPR {op.tpr:.4f}  "
            f"({op.n_real} reals){mark}"
        )
    for note in result["notes"]:
        print(f"masm calibrate: note: {note}", file=sys.stderr)
    print(f"stored in {checkpoint / 'config.json'}; report: {result['report']}")
    return 0

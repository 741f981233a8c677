"""``masm eval``: score a checkpoint on test sets (optionally under perturbations, optionally re-encoded
to check for a format bias) and write the report."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on test sets",
        description=(
            "Frame- and video-level AUC/AP/EER/ACC per test set and their mean: OUT/report.json, report.md, "
            "roc.png, predictions.csv, examples-NAME.png (top fakes, false alarms and misses with their "
            "explanation maps); with --perturb also robustness.json/.md/.png (AUC per perturbation and "
            "level, level 0 = clean). Test sets whose images name their generators (genimage:, univfd:, "
            "chameleon:) also get per-generator accuracy, AP and AUC and their mean."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/checkpoints/best)")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SPEC",
        help="test data spec, repeatable: dfb:PATH.json[@split], folder:DIR, genimage:ROOT[@split], "
        "univfd:ROOT or chameleon:ROOT",
    )
    parser.add_argument(
        "--perturb",
        action="append",
        default=[],
        metavar="NAME:LEVEL",
        help="robustness perturbation, repeatable: jpeg:3, blur (levels 1-5), or all",
    )
    parser.add_argument(
        "--bias-check",
        action="store_true",
        help="also score every test set with every image re-encoded the same way (JPEG) after decoding, and "
        "report how far AUC, AP and accuracy move (per generator too): a format bias, checked",
    )
    parser.add_argument(
        "--bias-check-quality",
        type=int,
        metavar="Q",
        help="JPEG quality of --bias-check's re-encoding, 1-100 (default 95)",
    )
    parser.add_argument("--frames", type=int, default=32, help="frames per video, evenly spaced (0: all)")
    parser.add_argument(
        "--data-root",
        help="folder that relative frame paths in a dfb: index resolve against (default: the index's "
        "own folder)",
    )
    parser.add_argument("--compression", default="c23", help="FF++-family compression level")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument(
        "--parity",
        action="store_true",
        help="DeepfakeBench parity: first-N frames and parent-folder video keys (labelled)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=4,
        help="per test set, sheet this many top-scoring fakes, false alarms and misses with their maps (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="report folder (default: beside the checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def default_out(checkpoint: Path) -> Path:
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":  # runs/x/checkpoints/best -> runs/x/eval-best
        return checkpoint.parent.parent / f"eval-{checkpoint.name}"
    return checkpoint.with_name(checkpoint.name + "-eval")


def run(args) -> int:
    from masm.data.perturb import parse_perturbation
    from masm.data.reencode import Reencoder
    from masm.errors import MasmError
    from masm.evaluation.bias_check import bias_check_table
    from masm.evaluation.evaluate import summary_table, undefined_metric_notes
    from masm.evaluation.generators import generators_section
    from masm.explain.evaluate import evaluate_checkpoint

    if args.frames < 0 or args.batch_size < 1 or args.workers < 0 or args.examples < 0:
        raise MasmError("--frames >= 0, --batch-size >= 1, --workers >= 0 and --examples >= 0 please")
    perturbations: list[tuple[str, int]] = []
    for text in args.perturb:
        perturbations += [p for p in parse_perturbation(text) if p not in perturbations]
    bias_check = None
    if args.bias_check_quality is not None and not args.bias_check:
        raise MasmError("--bias-check-quality sets the quality of --bias-check: add --bias-check")
    if args.bias_check:
        quality = args.bias_check_quality
        bias_check = Reencoder("jpeg") if quality is None else Reencoder("jpeg", quality)
    out = Path(args.out) if args.out else default_out(Path(args.checkpoint))
    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        out_dir=out,
        device=args.device,
        data_root=args.data_root,
        frames=args.frames,
        compression=args.compression,
        parity=args.parity,
        perturbations=perturbations,
        batch_size=args.batch_size,
        num_workers=args.workers,
        seed=args.seed,
        progress=not args.no_progress,
        examples=args.examples,
        bias_check=bias_check,
    )
    print(summary_table(result))
    per_generator = generators_section(result["datasets"])
    if per_generator:
        print(per_generator)
    if result.get("bias_check"):
        print(f"format bias check ({bias_check.describe()}, delta = re-encoded - as evaluated):")
        print(bias_check_table(result["bias_check"]))
    print(f"report: {result['report']}")
    notes = undefined_metric_notes(result)
    for note in notes:
        print(f"masm eval: warning: {note}", file=sys.stderr)
    return 1 if notes else 0

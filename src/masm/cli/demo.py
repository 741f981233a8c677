"""``masm demo``: offline end-to-end proof of the method (see :mod:`masm.demo.run`)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end run: synthetic forgeries, pretrained small backbone, MASM vs a baseline",
        description=(
            "Offline end-to-end run: writes synthetic forgeries, trains MASM (and a baseline) on a small "
            "pretrained backbone that ships with masm, and reports how each detects forgery families it "
            "never saw in training (OUT/report.md, roc.png, masks.png)."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="smaller data and budget (about 3 minutes)")
    parser.add_argument(
        "--baseline",
        help="baseline method to compare with (default: effort; none with --quick, which trains MASM alone)",
    )
    parser.add_argument(
        "--steps", type=int, help="training steps (default: as --quick or the full demo sets)"
    )
    parser.add_argument(
        "--train-reals", type=int, help="real training crops (default: as --quick or the full demo sets)"
    )
    parser.add_argument(
        "--eval-per-family",
        type=int,
        help="fakes per family of each test set (default: as --quick or the full demo sets)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data and the training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from dataclasses import replace

    from ..demo.run import FULL, QUICK, run_demo
    from ..errors import MasmError
    from ..models import METHODS

    if args.baseline is not None and (args.baseline not in METHODS or args.baseline == "masm"):
        raise MasmError(f"--baseline must be one of {', '.join(m for m in METHODS if m != 'masm')}")
    settings = replace(QUICK if args.quick else FULL, seed=args.seed)
    if args.baseline is not None:
        settings = replace(settings, baseline=args.baseline)
    if args.steps:
        settings = replace(settings, steps=args.steps)
    if args.train_reals:
        settings = replace(settings, train_reals=args.train_reals)
    if args.eval_per_family:
        settings = replace(settings, eval_per_family=args.eval_per_family)
    run_demo(args.out, settings, progress=not args.no_progress)
    return 0

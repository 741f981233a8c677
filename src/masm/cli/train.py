"""``masm train``: train a detector from a YAML config (one device, or many under ``torchrun``)."""

from __future__ import annotations

import os
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a detector from a YAML config",
        description=(
            "Train as CONFIG says (a YAML overlay of masm.training.TrainConfig; it may name `base:` files). "
            "Writes OUT/config.yaml, metrics.jsonl, masks.jsonl, checkpoints/{last,best}/ and, with test "
            "sets, eval/. Run under `torchrun --nproc_per_node N -m masm train ...` for DDP."
        ),
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-4 --set model.method.name=effort",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.training import load_train_config, train

    config = load_train_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(config, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    print(
        f"trained {result.global_step} steps ({result.epochs_completed} epochs); best {result.select_on} "
        f"frame AUC {best} at step {result.best_step}"
    )
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    if result.test:
        from masm.evaluation.evaluate import summary_table

        print(summary_table(result.test))
        print(f"test report: {result.test['report']}")
    return 0

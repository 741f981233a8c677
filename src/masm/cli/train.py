"""``masm train``: train a detector from a YAML config (one device, or many under ``torchrun``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a detector from a YAML config, or continue a run",
        description=(
            "Train as CONFIG says (a YAML file; it may name base: files it extends). Writes OUT/config.yaml, "
            "metrics.jsonl, masks.jsonl, checkpoints/last and checkpoints/best, and with test sets eval/. "
            "Continue a stopped run with: masm train --resume --out OUT (no CONFIG: the run's own config). "
            "To train on N GPUs, run: torchrun --nproc_per_node N -m masm train ..."
        ),
    )
    parser.add_argument("config", nargs="?", help="YAML config file (see configs/); optional with --resume")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, repeatable, e.g. --set optim.lr=1e-4 --set model.backbone=DIR "
        "(a backbone saved locally)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its newest complete checkpoint, with the run's own config",
    )
    parser.add_argument(
        "--resume-changed",
        action="store_true",
        help="with --resume: accept a config that changes more than the run's length or logging (recorded "
        "in OUT/changes.jsonl)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that holds an earlier run (deletes it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.errors import ConfigError
    from masm.training import DistributedFailure, config_from_run, load_train_config, train

    if args.config is None and not (args.resume and args.out):
        raise ConfigError("give a CONFIG file, or --resume --out RUN to continue a run with its own config")
    if args.resume_changed and not args.resume:
        raise ConfigError("--resume-changed only applies with --resume")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite deletes it: choose one")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.config is None:
        config = config_from_run(out, args.overrides)
    else:
        config = load_train_config(args.config, args.overrides)
    try:
        result = train(
            config,
            out,
            resume=args.resume,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            resume_changed=args.resume_changed,
        )
    except DistributedFailure as err:
        # Every rank ends with the failing rank's message and status 1. os._exit skips the interpreter's
        # shutdown, where the destructor of an aborted NCCL process group can raise SIGABRT.
        sys.stdout.flush()
        print(f"masm train: error: {err}", file=sys.stderr, flush=True)
        os._exit(DistributedFailure.exit_code)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    print(
        f"trained {result.global_step} steps ({result.epochs_completed} epochs); best {result.select_on} "
        f"frame AUC {best} at step {result.best_step}"
    )
    if result.frames_failed:
        print(
            f"{result.frames_failed} training samples failed to load or forge and were skipped (see the log)"
        )
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    if result.test:
        from masm.evaluation.evaluate import summary_table

        print(summary_table(result.test))
        print(f"test report: {result.test['report']}")
    return 0

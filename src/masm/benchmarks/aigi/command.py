"""``masm bench aigi``'s options and a run from them. Nothing here imports torch at import time: ``masm
--help`` builds this parser."""

from __future__ import annotations

import time

from ..common import add_common_arguments, beside, machine_info, write_result
from ..quality import LR, METHODS

# Every method of `bench quality` may run; by default the adapters, full fine-tuning and the two cheap
# baselines (FMSD and Effort's regularised variant are MASM / Effort variants: ask for them by name).
DEFAULT_METHODS = ("masm", "effort", "lora", "full", "linear", "ln-tune")
# The generators (masm.benchmarks.aigi.generators.GENERATORS), not imported: that module imports torch.
GENERATOR_NAMES = ("tconv", "nearest", "bilinear", "shuffle", "tconv-x8")
TRAIN_GENERATOR = "tconv"


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel, one process and one thread each"
    )
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of the adapter methods")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    parser.add_argument(
        "--train-generator",
        default=TRAIN_GENERATOR,
        choices=GENERATOR_NAMES,
        help="the one generator whose fakes train (and select) every detector",
    )
    parser.add_argument(
        "--generators",
        default=",".join(GENERATOR_NAMES),
        help="comma-separated generators tested (the training one is always tested)",
    )
    parser.add_argument("--size", type=int, default=64, help="crop size")
    parser.add_argument(
        "--train-reals", type=int, default=4000, help="real training crops (each with its reconstruction)"
    )
    parser.add_argument(
        "--eval-per-generator",
        type=int,
        default=150,
        help="real crops of the validation and test sets, and fakes per generator of each",
    )
    parser.add_argument(
        "--generator-steps", type=int, default=400, help="training steps of each generator's autoencoder"
    )
    parser.add_argument(
        "--backbone", default="demo-clip", help="backbone (default: the demo's pretrained one)"
    )
    add_common_arguments(
        parser,
        "aigi",
        figures="the AUC, AP and accuracy tables beside it as FILE.md",
        work="the trained generators and the data (reused when there) and every run's folder",
        progress="no progress lines while the generators train or the demo backbone is pretrained",
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def run(args) -> int:
    from ...demo.experiment import RunSettings
    from ...demo.run import ensure_demo_backbone
    from ...errors import MasmError
    from .data import AigiDataSettings, prepare_aigi_data
    from .report import format_summary, summarize
    from .runs import run_all

    methods = _names(args.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise MasmError(f"unknown method {(unknown or [''])[0]!r}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise MasmError(f"--seeds must be at least 1, got {args.seeds}")
    data = AigiDataSettings(
        train_generator=args.train_generator,
        generators=tuple(_names(args.generators)),
        train_reals=args.train_reals,
        eval_per_generator=args.eval_per_generator,
        size=args.size,
        generator_steps=args.generator_steps,
    )
    if args.backbone == "demo-clip":
        ensure_demo_backbone(progress=not args.no_progress)
    start = time.perf_counter()
    splits = prepare_aigi_data(args.work, data, progress=not args.no_progress)
    data_seconds = time.perf_counter() - start
    print(splits.describe())
    settings = RunSettings(backbone=args.backbone, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    jobs = [(m, seed, args.work / "runs" / m / f"seed{seed}") for m in methods for seed in range(args.seeds)]
    runs = []
    start = time.perf_counter()
    for result in run_all(jobs, splits, settings, args.jobs):
        runs.append(result)
        mean = result["mean_unseen"]
        print(
            f"{result['method']:10s} seed {result['seed']}: {args.train_generator} AUC "
            f"{result['generators'][args.train_generator]['auc']:.4f}  unseen generators: AUC "
            f"{mean['auc']:.4f}  AP {mean['ap']:.4f}  acc {mean['acc']:.4f}  ({result['train_seconds']:.0f} s)",
            flush=True,
        )
    order = {(m, seed): i for i, (m, seed, _) in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["method"], r["seed"])])
    summary = summarize(runs)
    meta = {
        "command": "masm bench aigi " + " ".join(_argv(args)),
        "train_generator": splits.train_generator,
        "test_generators": splits.test_generators,
        "generators": splits.recipes,
        "seeds": args.seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "backbone": args.backbone,
        "splits": splits.describe(),
        "data_seconds": round(data_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
    }
    table = format_summary(summary, splits.train_generator)
    markdown = beside(args.out, ".md")
    markdown.write_text(f"{table}\n{meta['splits']}\n")
    write_result(args.out, {"meta": meta, "summary": summary, "runs": runs}, table, figures=(markdown,))
    return 0


def _argv(args) -> list[str]:
    return [
        f"--seeds {args.seeds}",
        f"--jobs {args.jobs}",
        f"--steps {args.steps}",
        f"--batch-size {args.batch_size}",
        f"--lr {args.lr}",
        f"--methods {args.methods}",
        f"--train-generator {args.train_generator}",
        f"--generators {args.generators}",
        f"--size {args.size}",
        f"--train-reals {args.train_reals}",
        f"--eval-per-generator {args.eval_per_generator}",
        f"--generator-steps {args.generator_steps}",
        f"--backbone {args.backbone}",
    ]

"""``masm bench quality``: leave-family-out generalisation of every method, plus MASM ablations.

Same backbone (the demo's locally pretrained CLIP vision tower by default), same data (real crops with
forgeries of the training families made on the fly; fixed, seeded test sets), same step budget for every
method; several seeds. The table reports mean ± std of the frame AUC in distribution, on the held-out
forgery families (never seen in training) and on forgeries made from photos never seen, and how far each
method moved the pretrained attention weights (``‖W − W⁰‖ / ‖W⁰‖``, mean over seeds). See
:mod:`masm.demo.experiment`. The data (reused when there) and each run's folder go to ``--work``; every
run's figures and the summary to ``--out FILE.json``, the table beside it as ``FILE.md``.
"""

from __future__ import annotations

import statistics
import time

from .common import add_common_arguments, beside, machine_info, write_result

METHODS = ["masm", "fmsd", "effort", "effort-reg", "lora", "full", "linear", "ln-tune"]


def _masm(**masm) -> dict:
    return {"model": {"method": {"masm": masm}}}


ABLATIONS: dict[str, tuple[str, dict]] = {
    "masm guard=off": ("masm", _masm(semantic_guard="off")),
    "masm r_g=r (guard over all)": ("masm", _masm(guard_rank=1.0)),
    "masm no L_orth": ("masm", _masm(lambda_orth=0.0)),
    "masm no L_spec": ("masm", _masm(lambda_spec=0.0)),
    "masm no mask": ("masm", _masm(mask={"enabled": False})),
    # FMSD's fraction of layers adapted (default 0.5)
    "fmsd fraction=0.25": ("fmsd", _masm(select={"fraction": 0.25})),
    "fmsd fraction=0.75": ("fmsd", _masm(select={"fraction": 0.75})),
}
# Further ablations, run with --more-ablations (each costs as much as a method).
MORE_ABLATIONS: dict[str, tuple[str, dict]] = {
    "masm K=2": ("masm", _masm(num_subspaces=2)),
    "masm K=8": ("masm", _masm(num_subspaces=8)),
    "masm m=2": ("masm", _masm(subspace_rank=2)),
    "masm m=8": ("masm", _masm(subspace_rank=8)),
    "masm no layer selection": ("masm", _masm(mask={"layer_selection": False})),
    "masm no subspace balance": ("masm", _masm(mask={"subspace_balance": False})),
}


# The demo's settings (masm.demo.experiment: DEFAULT_TRAIN_FAMILIES, DEMO_STRENGTH, RunSettings.lr), not
# imported here because `masm --help` must not load torch; a test keeps them equal.
TRAIN_FAMILIES = "blend"
STRENGTH = 5.0
LR = 3e-3


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel, one process and one thread each"
    )
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of the adapter methods")
    parser.add_argument("--train-reals", type=int, default=4000, help="real training crops")
    parser.add_argument("--eval-per-family", type=int, default=150, help="fakes per family of each test set")
    parser.add_argument("--size", type=int, default=64, help="crop size")
    parser.add_argument(
        "--strength", type=float, default=STRENGTH, help="artifact magnitude of the forgeries"
    )
    parser.add_argument(
        "--backbone", default="demo-clip", help="backbone (default: the demo's pretrained one)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--no-ablations", action="store_true", help="skip the MASM ablations")
    parser.add_argument(
        "--only",
        default="",
        help="run only these rows: comma-separated row labels (e.g. 'fmsd fraction=0.25'), a method name "
        "standing for its own row and its ablations (default: every row)",
    )
    parser.add_argument("--more-ablations", action="store_true", help="also K, m and mask-rule ablations")
    parser.add_argument(
        "--train-families",
        default=TRAIN_FAMILIES,
        help="families seen in training (the others are held out)",
    )
    add_common_arguments(
        parser,
        "quality",
        figures="the table beside it as FILE.md",
        work="the generated data (reused when there) and every run's folder, one per row and seed",
        progress="no progress bar while the demo backbone is pretrained (the first run on a machine)",
    )


def run(args) -> int:
    from ..demo.experiment import DataSettings, RunSettings, prepare_data
    from ..demo.run import ensure_demo_backbone
    from ..errors import MasmError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise MasmError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.backbone == "demo-clip":
        ensure_demo_backbone(progress=not args.no_progress)
    data = DataSettings(
        train_reals=args.train_reals,
        eval_per_family=args.eval_per_family,
        size=args.size,
        strength=args.strength,
        train_families=tuple(args.train_families.split(",")),
    )
    splits = prepare_data(args.work / "data", data)
    print(splits.describe())
    settings = RunSettings(backbone=args.backbone, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    plan = [(m, m, {}) for m in methods]
    if not args.no_ablations:
        plan += [(name, method, overrides) for name, (method, overrides) in ABLATIONS.items()]
        if args.more_ablations:
            plan += [(name, method, overrides) for name, (method, overrides) in MORE_ABLATIONS.items()]
    plan = only_rows(plan, args.only)
    jobs = [
        (label, method, overrides, seed, args.work / "runs" / _slug(label) / f"seed{seed}")
        for label, method, overrides in plan
        for seed in range(args.seeds)
    ]
    runs = []
    start = time.perf_counter()
    for result in _run_all(jobs, splits, settings, args.jobs):
        runs.append(result)
        print(
            f"{result['label']:28s} seed {result['seed']}: in-dist AUC {result['indist_auc']:.4f}  held-out "
            f"AUC {result['heldout_auc']:.4f}  unseen photos {result['unseen_auc']:.4f}  "
            f"({result['train_seconds']:.0f} s)",
            flush=True,
        )
    order = {(label, seed): i for i, (label, _, _, seed, _) in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["label"], r["seed"])])
    summary = summarize(runs)
    meta = {
        "command": "masm bench quality " + " ".join(_argv(args)),
        "seeds": args.seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "backbone": args.backbone,
        "splits": splits.describe(),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
    }
    table = format_summary(summary)
    markdown = beside(args.out, ".md")
    markdown.write_text(f"{table}\n\n{meta['splits']}\n")
    write_result(args.out, {"meta": meta, "summary": summary, "runs": runs}, table, figures=(markdown,))
    return 0


def only_rows(plan: list[tuple[str, str, dict]], only: str) -> list[tuple[str, str, dict]]:
    """The rows of ``plan`` that ``only`` names (all of them when it is empty): by label, or by method (its
    row and its ablations). A name that matches no row is an error listing the rows."""
    from ..errors import MasmError

    wanted = [name.strip() for name in only.split(",") if name.strip()]
    if not wanted:
        return plan
    unmatched = [w for w in wanted if not any(w in (label, method) for label, method, _ in plan)]
    if unmatched:
        rows = ", ".join(label for label, _, _ in plan)
        raise MasmError(f"--only {unmatched[0]!r} matches no row of this run; rows: {rows}")
    return [row for row in plan if row[0] in wanted or row[1] in wanted]


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def _one_run(job, splits, settings, threads: int | None) -> dict:
    from ..demo.experiment import run_method

    if threads is not None:  # a worker process: one intra-op thread each, so workers do not fight
        import torch

        torch.set_num_threads(threads)
    label, method, overrides, seed, out = job
    result = run_method(method, splits, out, settings, seed=seed, overrides=overrides)
    result.pop("evaluation")
    result["label"] = label
    return result


def _run_all(jobs, splits, settings, workers: int):
    """Results of every run, in completion order; ``workers`` > 1 runs them in that many processes.

    Each run is seeded and single-threaded in a worker, so a result does not depend on ``workers``.
    """
    if workers <= 1:
        for job in jobs:
            yield _one_run(job, splits, settings, None)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_one_run, job, splits, settings, 1) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def summarize(runs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        entry: dict = {"n": len(group), "trainable_params": group[0]["trainable_params"]}
        for key in (
            "indist_auc",
            "heldout_auc",
            "unseen_auc",
            "heldout_tpr_at_fpr1",
            "unseen_tpr_at_fpr1",
            "train_seconds",
            "attn_weight_change",
        ):
            values = [r[key] for r in group if r.get(key) is not None]
            entry[key] = statistics.mean(values) if values else None
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[label] = entry
    return out


def format_summary(summary: dict[str, dict]) -> str:
    from ..demo.experiment import RESULT_COLUMNS
    from ..evaluation.report import format_table

    def pm(entry, key):
        if entry.get(key) is None:  # also a summary written before the column existed
            return "n/a"
        return f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}"

    rows = [
        [
            label,
            pm(e, "indist_auc"),
            pm(e, "heldout_auc"),
            pm(e, "unseen_auc"),
            pm(e, "heldout_tpr_at_fpr1"),
            pm(e, "unseen_tpr_at_fpr1"),
            "n/a" if e["attn_weight_change"] is None else f"{e['attn_weight_change']:.4f}",
            e["trainable_params"],
            f"{e['train_seconds']:.0f}",
            e["n"],
        ]
        for label, e in summary.items()
    ]
    columns = [
        *RESULT_COLUMNS[:4],
        "held-out TPR @ FPR 1 %",
        "unseen-photo TPR @ FPR 1 %",
        *RESULT_COLUMNS[4:],
    ]
    return format_table(rows, [*columns, "seeds"])


def _argv(args) -> list[str]:
    return (
        [
            f"--seeds {args.seeds}",
            f"--jobs {args.jobs}",
            f"--steps {args.steps}",
            f"--lr {args.lr}",
            f"--train-reals {args.train_reals}",
            f"--eval-per-family {args.eval_per_family}",
            f"--size {args.size}",
            f"--strength {args.strength}",
            f"--backbone {args.backbone}",
            f"--train-families {args.train_families}",
            f"--methods {args.methods}",
        ]
        + (["--no-ablations"] if args.no_ablations else [])
        + (["--more-ablations"] if args.more_ablations else [])
        + ([f"--only '{args.only}'"] if args.only else [])
    )

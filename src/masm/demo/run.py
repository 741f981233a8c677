"""``masm demo``: an offline end-to-end run that proves the method on this machine, in minutes.

1. a small CLIP vision tower pretrained on real photo crops (:mod:`masm.demo.pretrain`; shipped);
2. real photo crops, from which blended forgeries are made on the fly during training, as self-blended
   images are made from real faces (``data.pseudo_fakes``), and fixed, seeded test sets from the same
   generator (:mod:`masm.data.synth`);
3. MASM and a baseline trained with the same trainer and budget;
4. both evaluated on the training family, on the five families they never saw, and on forgeries made
   from photos they never saw; a report, ROC curves, the mask heat map and an example sheet (MASM's
   highest-scoring fakes, false alarms and misses of the in-distribution test, each with its explanation
   map).

The trained MASM detector is left at ``OUT/model``: a checkpoint for ``masm eval`` and ``masm detect``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .experiment import DEMO_STRENGTH

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    train_reals: int = 4000  # real crops written once; forgeries are made from them on the fly
    eval_per_family: int = 150  # fakes per family in each fixed evaluation set
    size: int = 64
    strength: float = DEMO_STRENGTH  # subtle (1) forgeries need far more than minutes of training
    steps: int = 1000
    batch_size: int = 32
    baseline: str | None = "effort"  # None: MASM alone
    seed: int = 0


FULL = DemoSettings()
# --quick trains MASM alone, for more steps than each method of the full demo gets per minute
QUICK = DemoSettings(train_reals=1000, eval_per_family=100, steps=700, baseline=None)


def ensure_demo_backbone(progress: bool = True) -> Path:
    """The demo backbone's directory: a rebuilt one in the cache, else the packaged one, else pretrain."""
    from ..models.backbones import demo_backbone_dir, packaged_demo_backbone_dir
    from .pretrain import pretrain_demo_backbone

    path = demo_backbone_dir()
    for candidate in (path, packaged_demo_backbone_dir()):
        if (candidate / "config.json").is_file():
            return candidate
    print(f"pretraining the demo backbone on real photo crops (once; cached at {path}) ...", flush=True)
    return pretrain_demo_backbone(path, progress=progress)


def run_demo(out_dir: Path, settings: DemoSettings, *, progress: bool = True) -> dict:
    from ..evaluation.plots import plot_mask_heatmap
    from ..evaluation.report import format_table
    from .experiment import RESULT_COLUMNS, DataSettings, RunSettings, prepare_data, run_method

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_demo_backbone(progress=progress)
    data = DataSettings(
        train_reals=settings.train_reals,
        eval_per_family=settings.eval_per_family,
        size=settings.size,
        strength=settings.strength,
        seed=settings.seed,
    )
    splits = prepare_data(out_dir / "data", data, progress=progress)
    print(f"data: {splits.describe()}", flush=True)
    run_settings = RunSettings(steps=settings.steps, batch_size=settings.batch_size)
    methods: dict[str, dict] = {}
    for method in ("masm", settings.baseline) if settings.baseline else ("masm",):
        print(f"training {method} for {settings.steps} steps ...", flush=True)
        methods[method] = run_method(
            method,
            splits,
            out_dir / "runs" / method,
            run_settings,
            seed=settings.seed,
            progress=progress,
            report_dir=out_dir / f"{method}-eval",
        )
        r = methods[method]
        print(
            f"  in-distribution AUC {r['indist_auc']:.4f}, held-out families {r['heldout_auc']:.4f}, "
            f"unseen photos {r['unseen_auc']:.4f}",
            flush=True,
        )

    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(methods["masm"]["checkpoint"], model_dir)
    masks = out_dir / "runs" / "masm" / "masks.jsonl"
    if masks.is_file() and masks.stat().st_size:
        plot_mask_heatmap(masks, out_dir / "masks.png")
    shutil.copy(out_dir / "masm-eval" / "roc.png", out_dir / "roc.png")
    examples = out_dir / "masm-eval" / "examples-in-distribution.png"
    if examples.is_file():
        shutil.copy(examples, out_dir / "examples.png")

    rows = [
        [
            name,
            r["indist_auc"],
            r["heldout_auc"],
            r["unseen_auc"],
            r["attn_weight_change"],
            r["trainable_params"],
            r["train_seconds"],
        ]
        for name, r in methods.items()
    ]
    table = format_table(rows, RESULT_COLUMNS)
    decisions = operating_point_table(methods["masm"]["operating_points"])
    seconds = time.perf_counter() - start
    report = {
        "settings": asdict(settings),
        "splits": splits.describe(),
        "train_families": splits.train_families,
        "heldout_families": splits.heldout_families,
        "methods": {
            name: {k: v for k, v in r.items() if k not in ("evaluation", "checkpoint")}
            for name, r in methods.items()
        },
        "model": str(model_dir),
        "seconds": round(seconds, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(
        "# masm demo\n\n"
        f"Trained from real crops alone, with forgeries of {', '.join(splits.train_families)} made on the "
        f"fly; tested on the same families (in-distribution), on held-out families "
        f"{', '.join(splits.heldout_families)} (never seen in training), and on every family made from "
        f"photos never seen (unseen photos).\n\n"
        f"{table}\n\n{decisions}{splits.describe()}\n\nROC curves: roc.png; selective mask: masks.png; where MASM "
        "looks (in-distribution test: highest-scoring fakes, false alarms, misses, with their explanation "
        "maps): examples.png; "
        f"detector: model/ (use with `masm eval` / `masm detect`). Took {seconds:.0f} s.\n"
    )
    print(table)
    if decisions:
        print(decisions)
    print(f"wrote {out_dir / 'report.md'}; detector at {model_dir} ({seconds:.0f} s in all)")
    return report


def operating_point_table(drift: dict[str, dict]) -> str:
    """Markdown: MASM's stored operating points (chosen on the validation split at the end of training)
    and the false-alarm and detection rates they give on each test set, with the FPR's drift."""
    from ..evaluation.report import format_table

    if not drift:
        return ""
    parts = []
    for point, per_set in drift.items():
        chosen = next(iter(per_set.values()))["chosen_on"]
        parts.append(
            f"MASM's operating point {point}, chosen on {chosen['data']} ({chosen['n_real']} reals: FPR "
            f"{chosen['fpr']:.4f}, TPR {chosen['tpr']:.4f}), threshold {next(iter(per_set.values()))['threshold']:.4f} "
            "on the calibrated score, on each test set:\n"
        )
        rows = [[name, r["fpr"], r["fpr_drift"], r["tpr"], r["n_real"]] for name, r in per_set.items()]
        parts.append(format_table(rows, ["test set", "FPR", "FPR drift", "TPR", "reals"]))
    return "\n".join(parts) + "\n"

"""``masm demo``: an offline end-to-end run that proves the method on this machine, in minutes.

1. a locally pretrained small CLIP vision tower (:mod:`masm.demo.pretrain`; built once, then reused);
2. a synthetic multi-forgery dataset from real photos (:mod:`masm.data.synth`);
3. MASM and a baseline trained on some forgery families with the same trainer and budget;
4. both evaluated on forgery families they never saw; a report, ROC curves and the mask heat map.

The trained MASM detector is left at ``OUT/model``: a checkpoint for ``masm eval`` and ``masm detect``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    per_family: int = 200
    size: int = 64
    strength: float = 3.0  # artifact magnitude: subtle (1) forgeries need far more than minutes of training
    steps: int = 300
    batch_size: int = 32
    baseline: str = "effort"
    seed: int = 0


FULL = DemoSettings(per_family=300, steps=600)
QUICK = DemoSettings(per_family=100, steps=200)


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


def ensure_synthetic_data(
    out_dir: Path, *, per_family: int, size: int, strength: float, seed: int = 0, progress: bool = True
) -> Path:
    """A ``masm synth`` dataset at ``out_dir``, reused when one with the same parameters is there."""
    from ..data.synth import synthesize

    marker = out_dir / "synth.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        wanted = {"size": size, "seed": seed, "strength": strength}
        same = all(made.get(key) == value for key, value in wanted.items())
        if same and set(made["counts"]["fake"].values()) == {per_family}:
            return out_dir
    synthesize(
        out_dir,
        per_family=per_family,
        size=size,
        seed=seed,
        strength=strength,
        progress=progress,
        overwrite=True,
    )
    return out_dir


def run_demo(out_dir: Path, settings: DemoSettings, *, progress: bool = True) -> dict:
    from ..evaluation.plots import plot_mask_heatmap
    from ..evaluation.report import format_table
    from .experiment import RESULT_COLUMNS, RunSettings, run_method, split_synthetic

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_demo_backbone(progress=progress)
    data_dir = ensure_synthetic_data(
        out_dir / "data",
        per_family=settings.per_family,
        size=settings.size,
        strength=settings.strength,
        seed=settings.seed,
        progress=progress,
    )
    splits = split_synthetic(data_dir)
    print(f"data: {splits.describe()}", flush=True)
    run_settings = RunSettings(steps=settings.steps, batch_size=settings.batch_size)
    methods: dict[str, dict] = {}
    for method in ("masm", settings.baseline):
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
        print(f"  held-out AUC {methods[method]['heldout_auc']:.4f}", flush=True)

    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(methods["masm"]["checkpoint"], model_dir)
    masks = out_dir / "runs" / "masm" / "masks.jsonl"
    if masks.is_file() and masks.stat().st_size:
        plot_mask_heatmap(masks, out_dir / "masks.png")
    shutil.copy(out_dir / "masm-eval" / "roc.png", out_dir / "roc.png")

    rows = [
        [
            name,
            r["heldout_auc"],
            r["indist_auc"],
            r["attn_weight_change"],
            r["trainable_params"],
            r["train_seconds"],
        ]
        for name, r in methods.items()
    ]
    table = format_table(rows, RESULT_COLUMNS)
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
        f"Trained on {', '.join(splits.train_families)}; tested on held-out families "
        f"{', '.join(splits.heldout_families)} (never seen in training).\n\n"
        f"{table}\n\n{splits.describe()}\n\nROC curves: roc.png; selective mask: masks.png; "
        f"detector: model/ (use with `masm eval` / `masm detect`). Took {seconds:.0f} s.\n"
    )
    print(table)
    print(f"wrote {out_dir / 'report.md'}; detector at {model_dir} ({seconds:.0f} s in all)")
    return report

"""Leave-family-out experiments on synthetic forgeries: shared by ``masm demo`` and ``masm bench quality``.

The synthetic dataset (:mod:`masm.data.synth`) has real photo crops and several forgery families with
distinct artifact types. A detector is trained on the ``train_families`` and tested on the held-out ones,
which it never saw: the question MASM answers is whether fine-tuning keeps enough pretrained structure,
and learns enough different artifacts, to generalise to new forgeries. Every method runs through the same
trainer (:func:`masm.training.train`) with the same backbone, data, step budget and seed.

Splits are by crop, deterministic (a hash of the file name): 60 % train, 15 % validation (training
families only; model selection happens here, never on held-out data), 25 % test. Held-out test = test reals
+ held-out-family fakes; in-distribution test = test reals + training-family fakes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.spec import FrameIndex, open_dataset

DEFAULT_TRAIN_FAMILIES = ("blend", "splice", "resample")


@dataclass
class Splits:
    train: FrameIndex
    val: FrameIndex
    heldout: FrameIndex
    indist: FrameIndex
    train_families: list[str]
    heldout_families: list[str]

    def describe(self) -> str:
        return (
            f"train {len(self.train.records)} crops ({', '.join(self.train_families)}), "
            f"val {len(self.val.records)}, held-out test {len(self.heldout.records)} "
            f"({', '.join(self.heldout_families)}), in-distribution test {len(self.indist.records)}"
        )


@dataclass
class RunSettings:
    """Budget and optimisation shared by every method of a comparison."""

    backbone: str = "demo-clip"
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    full_lr: float = 1e-4  # full fine-tuning diverges from pretrained weights at adapter learning rates
    eval_every_steps: int = 100
    overrides: dict[str, Any] = field(default_factory=dict)


def split_synthetic(data_dir: str | Path, train_families=DEFAULT_TRAIN_FAMILIES) -> Splits:
    """Split a ``masm synth`` folder into train / val / held-out / in-distribution test indexes."""
    index = open_dataset(f"folder:{data_dir}", frames_per_video=1)
    families = sorted({r.family for r in index.records if r.family})
    train_families = [f for f in families if f in set(train_families)]
    heldout_families = [f for f in families if f not in set(train_families)]
    parts: dict[str, list] = {
        "train": [],
        "val": [],
        "test_real": [],
        "test_train_fam": [],
        "test_heldout": [],
    }
    for record in index.records:
        bucket = int(hashlib.sha256(Path(record.path).name.encode()).hexdigest()[:8], 16) % 100
        part = "train" if bucket < 60 else "val" if bucket < 75 else "test"
        if record.label == 1 and record.family in heldout_families:
            if part == "test":
                parts["test_heldout"].append(record)
            continue  # held-out families never reach training or validation
        if part == "test":
            parts["test_real" if record.label == 0 else "test_train_fam"].append(record)
        else:
            parts[part].append(record)
    name = Path(data_dir).name
    return Splits(
        train=FrameIndex(f"{name}-train", parts["train"]),
        val=FrameIndex(f"{name}-val", parts["val"]),
        heldout=FrameIndex("heldout", parts["test_real"] + parts["test_heldout"]),
        indist=FrameIndex("in-distribution", parts["test_real"] + parts["test_train_fam"]),
        train_families=train_families,
        heldout_families=heldout_families,
    )


def train_config(method: str, settings: RunSettings, seed: int, overrides: dict[str, Any] | None = None):
    """The :class:`TrainConfig` of one run: the method preset, the shared budget, ``overrides`` on top."""
    from ..config import merge_dicts
    from ..training.config import train_config_from_dict

    lr = settings.full_lr if method == "full" else settings.lr
    data = {
        # Synthetic crops are whole images, not aligned faces: the checkpoint must say so, or
        # `masm detect` would cut faces out of what it is given.
        "model": {
            "backbone": settings.backbone,
            "method": {"name": method},
            "preprocessing": {"input_size": _input_size(settings.backbone), "face_crop": None},
        },
        "data": {
            "train": "",
            "val": "none",
            "batch_size": settings.batch_size,
            "eval_batch_size": 128,
            "num_workers": 0,
            "augment": {"enabled": False},
        },
        "optim": {"lr": lr, "weight_decay": 0.0},
        "epochs": 1000,
        "max_steps": settings.steps,
        "seed": seed,
        "log_every": 25,
        "eval_every": settings.eval_every_steps,
        "eval_unit": "step",
        "checkpoint_every": 0,
    }
    # The mask's defaults (warm-up 100, interval 50) assume long runs; short budgets get proportionally
    # shorter ones, so that every run of a comparison actually masks.
    mask = {"warmup": min(100, settings.steps // 4), "interval": max(1, min(50, settings.steps // 8))}
    data["model"]["method"]["masm"] = {"mask": mask}
    data = merge_dicts(data, copy.deepcopy(settings.overrides))
    data = merge_dicts(data, copy.deepcopy(overrides or {}))
    return train_config_from_dict(data)


def run_method(
    method: str,
    splits: Splits,
    out_dir: str | Path,
    settings: RunSettings,
    *,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``method`` on the training families, select on validation, test on held-out families.

    With ``report_dir`` the test evaluation is also written there (report, ROC curves, predictions).
    """
    from ..evaluation.evaluate import evaluate_detector
    from ..models import load_checkpoint
    from ..training import train

    config = train_config(method, settings, seed, overrides)
    start = time.perf_counter()
    result = train(
        config, out_dir, progress=progress, train_data=splits.train.records, val_data=splits.val.records
    )
    train_seconds = time.perf_counter() - start
    detector = load_checkpoint(result.best_checkpoint, merge=True)
    evaluation = evaluate_detector(
        detector,
        [splits.heldout, splits.indist],
        out_dir=report_dir,
        frames=1,
        progress=False,
        device="cpu",
        num_workers=0,
        meta={"method": method, "seed": seed, "checkpoint": str(result.best_checkpoint)},
    )
    change = attention_weight_change(detector.backbone, settings.backbone)
    heldout = evaluation["datasets"]["heldout"]
    indist = evaluation["datasets"]["in-distribution"]
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides or {},
        "heldout_auc": heldout["frame"]["auc"],
        "indist_auc": indist["frame"]["auc"],
        "val_auc": result.best_metric,
        "best_step": result.best_step,
        "train_seconds": round(train_seconds, 2),
        "trainable_params": trainable_count(result.best_checkpoint),
        "attn_weight_change": change,
        "checkpoint": str(result.best_checkpoint),
        "evaluation": evaluation,
    }


# Columns of the result tables of `masm demo` and `masm bench quality`, in the order of their rows.
RESULT_COLUMNS = [
    "method",
    "held-out AUC",
    "in-distribution AUC",
    "attention ΔW/W",
    "trainable params",
    "train s",
]


def attention_weight_change(backbone, pretrained: str) -> float:
    """``‖W − W⁰‖_F / ‖W⁰‖_F`` over the attention projections, a trained (merged) backbone vs ``pretrained``.

    How far a method moved the pretrained weights that every adapter here targets: MASM's premise is to
    learn artifacts while keeping this small; full fine-tuning and LoRA are free to move it.
    """
    import torch

    trained = dict(backbone.named_modules())
    diff = total = 0.0
    with torch.no_grad():
        for name, weight0 in _pretrained_attention_weights(pretrained).items():
            weight = trained[name].weight.float().cpu()
            diff += (weight - weight0).pow(2).sum().item()
            total += weight0.pow(2).sum().item()
    return math.sqrt(diff / total) if total else 0.0


@functools.lru_cache(maxsize=1)
def _pretrained_attention_weights(backbone: str) -> dict:
    """The backbone's attention projection weights (float32, CPU), loaded once for all runs of a comparison."""
    from ..method.apply import find_targets
    from ..method.config import ATTENTION_TARGETS
    from ..models.backbones import load_backbone

    targets = find_targets(load_backbone(backbone), ATTENTION_TARGETS)
    return {name: linear.weight.detach().float().cpu() for name, linear in targets}


@functools.lru_cache(maxsize=8)
def _input_size(backbone: str) -> int:
    """The backbone's native input size (looked up once per backbone, not once per run)."""
    from ..models.backbones import load_backbone

    return int(load_backbone(backbone).config.image_size)


def trainable_count(checkpoint: str | Path) -> int:
    """Trainable parameters of a run, read from its adapter checkpoint (which holds exactly those + head)."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "model.safetensors"), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())

"""Leave-family-out experiments on synthetic forgeries: shared by ``masm demo`` and ``masm bench quality``.

A detector is trained from real photo crops alone, with forgeries of the ``train_families`` made on the
fly from them (``data.pseudo_fakes``, :mod:`masm.data.pseudo_fakes`), and tested on fixed, seeded sets
written by the same generator (:mod:`masm.data.synth`):

* ``val``: new crops of the training photos, training families (model selection happens here only);
* ``indist``: new crops of the training photos, training families (the in-distribution test);
* ``heldout``: the same real test crops with fakes of the held-out families, never seen in training;
* ``unseen``: crops of photos never seen in pretraining or training, every family (``masm eval`` on it
  is the demo's "forgeries it never saw, made from photos it never saw" in docs/benchmarks.md).

Every real and fake image goes through the same global post-processing (colour jitter, JPEG quality), so
only the local manipulation separates them. Every method runs through the same trainer
(:func:`masm.training.train`) with the same backbone, data, step budget and seed.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.index import FrameIndex
from ..data.spec import open_dataset
from ..method.config import ATTENTION_AND_MLP_TARGETS

# Training family: blending alone, as self-blended images (SBI) train a face-forgery detector from real
# faces. Held out: resampling and re-compression traces, a region pasted from another photo, a noise
# inconsistency and a generator's periodic fingerprint. With blend, resample and double_jpeg in training,
# 600 steps left every method near in-distribution AUC 0.83 (double_jpeg 0.64): the comparison could not
# afford the steps to learn them, and held-out AUCs stayed at chance. Blend alone: 0.93-0.96 after 450
# steps for MASM, Effort, LoRA and full fine-tuning (bench quality, 1 seed), held-out 0.58-0.61.
DEFAULT_TRAIN_FAMILIES = ("blend",)
# Artifact strength of the comparison: strong enough for a small backbone to learn within minutes, and
# the strongest at which global statistics still stay near chance (tests/test_synth.py).
DEMO_STRENGTH = 5.0


@dataclass
class Splits:
    train: FrameIndex  # real crops only: fakes are made on the fly
    val: FrameIndex
    heldout: FrameIndex
    indist: FrameIndex
    unseen: FrameIndex
    train_families: list[str]
    heldout_families: list[str]
    strength: float
    root: Path

    def describe(self) -> str:
        return (
            f"train {len(self.train.records)} real crops + on-the-fly fakes ({', '.join(self.train_families)}), "
            f"val {len(self.val.records)}, in-distribution test {len(self.indist.records)}, held-out test "
            f"{len(self.heldout.records)} ({', '.join(self.heldout_families)}), unseen-photo test "
            f"{len(self.unseen.records)} (all families)"
        )


@dataclass
class DataSettings:
    """The synthetic data of a comparison: sizes, artifact strength, families, seed."""

    train_reals: int = 4000
    eval_per_family: int = 150  # fakes per family in each fixed evaluation set
    size: int = 64
    strength: float = DEMO_STRENGTH
    train_families: tuple[str, ...] = DEFAULT_TRAIN_FAMILIES
    seed: int = 0


@dataclass
class RunSettings:
    """Budget and optimisation shared by every method of a comparison."""

    backbone: str = "demo-clip"
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3  # adapters (MASM, Effort, LoRA), LayerNorm tuning and the linear probe
    full_lr: float = 3e-4  # full fine-tuning diverges from pretrained weights at adapter learning rates
    warmup_steps: int = 50  # then cosine decay to 0
    # Attention and MLP projections: with 4 blocks of 128 wide, attention alone leaves the adapters too
    # little to learn with in minutes (measured: in-distribution AUC 0.70 vs 0.80 after 600 steps).
    targets: str = ATTENTION_AND_MLP_TARGETS
    eval_every_steps: int = 150
    num_workers: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)


def prepare_data(root: str | Path, settings: DataSettings, progress: bool = False) -> Splits:
    """Write (or reuse) the comparison's data under ``root`` and return its splits."""
    from ..data import synth
    from .photos import demo_photos

    root = Path(root)
    train_photos, unseen_photos = demo_photos()
    families = list(synth.FAMILIES)
    train_families = synth.check_families(settings.train_families)
    heldout_families = [f for f in families if f not in train_families]
    n_eval = settings.eval_per_family
    sets = {
        # name: (photos, families, fakes per family, reals, seed offset, post-processed)
        "train": (train_photos, train_families, 0, settings.train_reals, 0, False),
        "val": (train_photos, train_families, n_eval, n_eval * len(train_families), 1, True),
        "test": (train_photos, families, n_eval, n_eval * len(train_families), 2, True),
        "unseen": (unseen_photos, families, n_eval // 2, n_eval * len(families) // 2, 3, True),
    }
    for name, (photos, fams, per_family, reals, offset, post) in sets.items():
        _ensure_synth(
            root / name,
            photos=photos,
            families=fams,
            per_family=per_family,
            num_real=reals,
            size=settings.size,
            seed=1000 * settings.seed + offset,
            strength=settings.strength,
            post=post,
            progress=progress,
        )
    frames = {name: open_dataset(f"folder:{root / name}", frames_per_video=1) for name in sets}
    test_real = [r for r in frames["test"].records if r.label == 0]
    test_fake = [r for r in frames["test"].records if r.label == 1]
    return Splits(
        train=FrameIndex("train-reals", frames["train"].records),
        val=FrameIndex("val", frames["val"].records),
        heldout=FrameIndex("heldout", test_real + [r for r in test_fake if r.family in heldout_families]),
        indist=FrameIndex(
            "in-distribution", test_real + [r for r in test_fake if r.family in train_families]
        ),
        unseen=FrameIndex("unseen-photos", frames["unseen"].records),
        train_families=train_families,
        heldout_families=heldout_families,
        strength=settings.strength,
        root=root,
    )


def _ensure_synth(out: Path, **kwargs) -> None:
    """``synthesize`` into ``out`` unless a set with the same parameters is already there."""
    import json

    from ..data import synth

    wanted = {k: kwargs[k] for k in ("per_family", "num_real", "size", "seed", "strength", "post")}
    wanted["families"] = list(kwargs["families"])
    marker = out / "synth.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        made_params = {
            "per_family": max(made["counts"]["fake"].values(), default=0),
            "num_real": made["counts"]["real"],
            "size": made["size"],
            "seed": made["seed"],
            "strength": made["strength"],
            "post": made.get("post_processed", True),
            "families": made["families"],
        }
        if made_params == wanted:
            return
    synth.synthesize(out, overwrite=True, **kwargs)


def train_config(
    method: str, splits: Splits, settings: RunSettings, seed: int, overrides: dict[str, Any] | None = None
):
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
            "eval_batch_size": 256,
            "num_workers": settings.num_workers,
            "augment": {"enabled": False},
            "pseudo_fakes": {
                "probability": 0.5,
                "families": list(splits.train_families),
                "strength": splits.strength,
                "region": "random",  # photo crops, not faces
                "post_process": True,  # as the fixed sets: global statistics do not separate the classes
            },
        },
        "optim": {
            "lr": lr,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "warmup_steps": min(settings.warmup_steps, settings.steps // 4),
        },
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
    data["model"]["method"]["masm"] = {"mask": mask, "target_modules": settings.targets}
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
    from ..explain.evaluate import evaluate_detector
    from ..models import load_checkpoint
    from ..training import train

    config = train_config(method, splits, settings, seed, overrides)
    start = time.perf_counter()
    result = train(  # the experiment owns its run folders: a rerun replaces them
        config,
        out_dir,
        progress=progress,
        train_data=splits.train.records,
        val_data=splits.val.records,
        overwrite=True,
    )
    train_seconds = time.perf_counter() - start
    detector = load_checkpoint(result.best_checkpoint, merge=True)
    evaluation = evaluate_detector(
        detector,
        [splits.heldout, splits.indist, splits.unseen],
        out_dir=report_dir,
        frames=1,
        progress=False,
        device="cpu",
        num_workers=0,
        meta={"method": method, "seed": seed, "checkpoint": str(result.best_checkpoint)},
    )
    change = attention_weight_change(detector.backbone, settings.backbone)
    datasets = evaluation["datasets"]
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides or {},
        "heldout_auc": datasets["heldout"]["frame"]["auc"],
        "indist_auc": datasets["in-distribution"]["frame"]["auc"],
        "unseen_auc": datasets["unseen-photos"]["frame"]["auc"],
        # the detection rate at a false-alarm rate of 1 % (frame level, threshold set on each test set)
        **{
            f"{key}_tpr_at_fpr1": datasets[name]["deployment"]["frame"]["tpr_at_fpr"]["0.01"]["tpr"]
            for key, name in (
                ("heldout", "heldout"),
                ("indist", "in-distribution"),
                ("unseen", "unseen-photos"),
            )
        },
        "val_auc": result.best_metric,
        "best_step": result.best_step,
        "train_seconds": round(train_seconds, 2),
        "trainable_params": trainable_count(result.best_checkpoint),
        "attn_weight_change": change,
        "checkpoint": str(result.best_checkpoint),
        "evaluation": evaluation,
        # the stored operating points (chosen on val at the end of training) on each test set
        "operating_points": operating_point_drift(evaluation),
    }


def operating_point_drift(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{point: {test set: {"fpr", "tpr", "fpr_drift", "chosen_on"}}}`` at frame level, from an evaluation
    of a calibrated detector (empty when it stores no operating point)."""
    drift: dict[str, dict[str, Any]] = {}
    for name, result in evaluation["datasets"].items():
        stored = result.get("deployment", {}).get("frame", {}).get("operating_points", {})
        for point, rates in stored.items():
            drift.setdefault(point, {})[name] = {
                k: rates[k] for k in ("threshold", "fpr", "tpr", "fpr_drift", "n_real", "chosen_on")
            }
    return drift


# Columns of the result tables of `masm demo` and `masm bench quality`, in the order of their rows.
RESULT_COLUMNS = [
    "method",
    "in-distribution AUC",
    "held-out AUC",
    "unseen-photo AUC",
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
    from ..models.factory import load_backbone

    targets = find_targets(load_backbone(backbone), ATTENTION_TARGETS)
    return {name: linear.weight.detach().float().cpu() for name, linear in targets}


@functools.lru_cache(maxsize=8)
def _input_size(backbone: str) -> int:
    """The backbone's native input size (looked up once per backbone, not once per run)."""
    from ..models.factory import load_backbone

    return int(load_backbone(backbone).config.image_size)


def trainable_count(checkpoint: str | Path) -> int:
    """Trainable parameters of a run, read from its adapter checkpoint (which holds exactly those + head)."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "model.safetensors"), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())

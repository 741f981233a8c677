"""Pretraining of the demo backbone: a small CLIP vision tower that keeps the low-level evidence of real photos.

MASM's premise is that a pretrained backbone carries structure in the principal singular directions of its
weights, and that forgery artifacts can be learned in small residual subspaces without disturbing it. A
randomly initialised backbone has no such structure, so the offline demo (which cannot download CLIP)
pretrains a tiny ``CLIPVisionModel`` itself. This module is the documented recipe of that backbone; every
number below is a constant of this module and is written to ``recipe.json`` next to the weights.

Why this objective. The previous recipe (SimCLR with blur and colour jitter) taught exactly the invariance
a forgery detector must not have. Masked image modelling alone (SimMIM) was measured to do the same to
fine detail: its features lost sensitivity to sensor noise, below a random network's, because nothing
in it rewards keeping what context cannot predict. The objective here therefore has three terms, all on
real photos only, none with an augmentation that changes texture:

* SimMIM: 60 % of the 8 x 8 px patches are hidden; a linear decoder predicts their pixels from the last
  layer's patch tokens (context, semantics);
* the visible patches are reconstructed too, by the same decoder (the encoder must keep fine detail);
* the pooled feature (``pooler_output``, what the detector's head reads) predicts, through a linear map,
  each visible patch's fine-detail energy (log mean squared Laplacian) and mean colour (it summarises
  where the detail and the colours of an image are, instead of staying untrained).

Targets are per-patch normalised pixels (MAE), so the reconstruction is about texture, not colour.

Recipe (``pretrain_demo_backbone`` defaults)
--------------------------------------------
* Model: :data:`DEMO_BACKBONE_CONFIG`, a 4-layer, 128-wide CLIP vision tower (4 heads, MLP 512, QuickGELU)
  at 64 px with 8 px patches (64 patches + CLS), 0.83 M parameters. Its attention projections are
  128 x 128, so a MASM fine-tune with K = 4, m = 4 keeps a principal rank of 112.
* Data: real photographs only, no forgery and no labels: random square crops (side 20-100 % of the photo's
  shorter side, log-uniform, random position, random horizontal flip) of the photographs that ship in
  scikit-image's data folder (colour ones, gray ones as gray RGB, the 200 LFW faces) and matplotlib's
  sample portrait; scikit-learn's two sample photos are kept unseen (:mod:`masm.demo.photos`). A fresh
  batch of crops is drawn every step from a generator seeded by ``(seed, step)``.
* Optimisation: AdamW, lr 1.5e-3, weight decay 0.05, betas (0.9, 0.95), linear warm-up over the first 5 %
  of the steps then cosine decay to 0, gradient norm clipped at 1.0; 1500 steps of 64 crops. Seeded
  initialisation and data, ``torch.use_deterministic_algorithms(True)`` and one intra-op thread: the same
  seed gives the same weights bit for bit on the same software stack.
* Cost: about 12.5 minutes on one core of this project's development machine (measured time and final
  loss are written to ``recipe.json``).
* Evidence of structure (:func:`backbone_structure`, written to ``recipe.json`` for the pretrained backbone
  and a random one of the same config and seed): a source-photo probe, view retrieval, and the attention
  projections' spectral energy share in their top singular values.

The weights are saved with ``save_pretrained`` (safetensors) into a temporary sibling directory that is
renamed into place only when complete, so an interrupted run never leaves half a backbone behind.

Where the recipe lives: the photos and their crops in :mod:`masm.demo.pretrain_data`, the objective in
:mod:`masm.demo.pretrain_objective`, the structure evidence in :mod:`masm.demo.pretrain_probe`; this module
holds the training loop, the atomic save and the ``python -m masm.demo.pretrain`` command.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..models.backbones import demo_backbone_dir
from ..models.preprocessing import CLIP_MEAN, CLIP_STD
from .pretrain_data import (
    CROP_SIDE,
    Source,
    crops_with_sources,
    photo_sources,
    real_photo_crops,
    to_model_input,
)
from .pretrain_objective import (
    MASK_RATIO,
    NORM_PIX_EPS,
    SUMMARY_WEIGHT,
    VISIBLE_WEIGHT,
    PixelDecoder,
    masked_reconstruction_loss,
    patchify,
    random_patch_mask,
)
from .pretrain_probe import augment_views, backbone_structure

# The whole recipe stays reachable from this module (its pieces live in pretrain_data, pretrain_objective
# and pretrain_probe): real_photo_crops, to_model_input, the objective's pieces and augment_views are part
# of what ``masm.demo.pretrain`` offers, not only what the loop below uses.
__all__ = [
    "DEMO_BACKBONE_CONFIG",
    "MASK_RATIO",
    "PixelDecoder",
    "augment_views",
    "backbone_structure",
    "is_complete_backbone",
    "main",
    "masked_reconstruction_loss",
    "patchify",
    "pretrain_demo_backbone",
    "random_patch_mask",
    "real_photo_crops",
    "to_model_input",
]

logger = logging.getLogger(__name__)

DEMO_BACKBONE_CONFIG = CLIPVisionConfig(
    hidden_size=128,  # attention projections 128 x 128: min(d_out, d_in) = 128 >> K*m = 16
    intermediate_size=512,  # the usual 4 x hidden
    num_hidden_layers=4,
    num_attention_heads=4,  # head dim 32
    image_size=64,  # the demo's input size
    patch_size=8,  # 8 x 8 patches: local artifacts stay visible to the tokens (64 patches + CLS)
    projection_dim=128,  # unused by CLIPVisionModel; kept equal to the width
    hidden_act="quick_gelu",  # CLIP's activation
)

# --- recipe constants (all written to recipe.json) -------------------------------------------------------
STEPS = 1500  # optimiser steps of the full recipe
BATCH_SIZE = 64  # crops per step
LEARNING_RATE = 1.5e-3
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
WARMUP_FRACTION = 0.05  # of the steps; then cosine decay to 0
GRAD_CLIP = 1.0
# One intra-op thread: the result then does not depend on the machine's core count, and on a shared or
# oversubscribed CPU two spinning OpenMP threads are many times slower than one (measured: 0.35 s vs
# 0.007 s for one colour jitter of a batch, with other jobs running).
THREADS = 1

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


# =========================================================================================================
# Pretraining


def pretrain_demo_backbone(
    out_dir: str | Path | None = None,
    *,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    real_dir: str | Path | None = None,
    learning_rate: float = LEARNING_RATE,
    evaluate: bool = True,
) -> Path:
    """Pretrain the demo backbone (see the module docstring) and save it to ``out_dir``.

    ``out_dir`` defaults to :func:`masm.models.backbones.demo_backbone_dir`, where the registry entry
    ``demo-clip`` loads it from. An existing complete backbone there is reused (whatever recipe built
    it) unless ``force``. ``evaluate`` adds :func:`backbone_structure` of the result and of a random
    backbone to ``recipe.json`` (about 20 s). Returns the directory.
    """
    out = Path(out_dir) if out_dir is not None else demo_backbone_dir()
    if not force and is_complete_backbone(out):
        logger.info("reusing the demo backbone in %s (force=True rebuilds it)", out)
        return out
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")

    start = time.perf_counter()
    model, losses = _train(steps, batch_size, seed, learning_rate, photo_sources(real_dir), progress)
    elapsed = time.perf_counter() - start
    tail = losses[-max(1, steps // 10) :]
    recipe: dict[str, Any] = {
        "config": model.config.to_diff_dict(),
        "objective": {
            "name": "simmim",
            "loss": "MSE on hidden patches + visible_weight x MSE on visible patches; target = the patch's "
            "pixels normalised by its own mean/std",
            "visible_weight": VISIBLE_WEIGHT,
            "summary": "linear map from pooler_output to each visible patch's standardised log mean squared "
            "Laplacian of the luma and its mean colour; MSE",
            "summary_weight": SUMMARY_WEIGHT,
            "mask_ratio": MASK_RATIO,
            "hidden_patch_value": "0 after CLIP normalisation (the mean colour)",
            "norm_pix_eps": NORM_PIX_EPS,
            "decoder": f"linear {model.config.hidden_size} -> 3x{model.config.patch_size}x{model.config.patch_size} "
            "on post-LayerNorm patch tokens",
            "augmentation": "random crop (scale, position), horizontal flip; nothing else",
            "normalisation": {"mean": CLIP_MEAN, "std": CLIP_STD},
        },
        "optimizer": {
            "name": "AdamW",
            "lr": learning_rate,
            "weight_decay": WEIGHT_DECAY,
            "betas": BETAS,
            "warmup_fraction": WARMUP_FRACTION,
            "schedule": "linear warm-up, cosine decay to 0",
            "grad_clip": GRAD_CLIP,
        },
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "data": {
            "source": str(real_dir) if real_dir is not None else "scikit-image data folder",
            "photos": [name for name, _ in photo_sources(real_dir)],
            "crop_side": CROP_SIDE,
            "labels": "none (self-supervised, real photos only)",
        },
        "time_s": round(elapsed, 1),
        "torch_threads": THREADS,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "final_loss": float(np.mean(tail)),
        "losses": [round(x, 5) for x in losses],
    }
    if evaluate:
        eval_start = time.perf_counter()
        with _deterministic():
            recipe["structure"] = {
                "pretrained": backbone_structure(model, seed=seed),
                "random_init": backbone_structure(_new_backbone(seed), seed=seed),
                "time_s": round(time.perf_counter() - eval_start, 1),
            }
    _save_atomically(model, recipe, out)
    logger.info("demo backbone saved to %s (%.0f s, final loss %.3f)", out, elapsed, recipe["final_loss"])
    return out


def is_complete_backbone(path: Path) -> bool:
    """Whether ``path`` holds a finished pretraining: config, weights and a readable recipe."""
    if not all((path / name).is_file() for name in ("config.json", WEIGHTS_FILE, RECIPE_FILE)):
        return False
    try:
        json.loads((path / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def _new_backbone(seed: int) -> CLIPVisionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModel(CLIPVisionConfig(**DEMO_BACKBONE_CONFIG.to_dict()))


def _train(
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float,
    sources: Sequence[Source],
    progress: bool,
    on_step: Callable[[int, CLIPVisionModel], None] | None = None,
) -> tuple[CLIPVisionModel, list[float]]:
    model = _new_backbone(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = PixelDecoder(model.config)
    params = list(model.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    losses: list[float] = []
    model.train()
    from tqdm.auto import tqdm

    with _deterministic():
        bar = tqdm(range(steps), desc="pretraining demo backbone", disable=not progress, leave=False)
        for step in bar:
            rng = np.random.default_rng([seed, step])
            crops, _ = crops_with_sources(batch_size, size, rng, sources)
            images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
            loss = masked_reconstruction_loss(model, decoder, images, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:  # e.g. snapshots of a long run
                on_step(step + 1, model)
    return model.eval(), losses


def _lr_factor(warmup: int, steps: int, step: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, restored afterwards."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


def _save_atomically(model: CLIPVisionModel, recipe: dict[str, Any], out: Path) -> None:
    """Write into a temporary sibling and rename it into place: readers never see half a backbone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        if out.exists():  # force=True, or an incomplete leftover: move it aside first, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The recipe command: ``python -m masm.demo.pretrain --out DIR [--force]``.

    ``masm`` ships the backbone this makes with the default recipe at ``masm/assets/demo-clip`` (made with
    ``python -m masm.demo.pretrain --out src/masm/assets/demo-clip --force``), so the demo needs no
    pretraining on first use; rerun it to check or to rebuild.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m masm.demo.pretrain", description=main.__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: $MASM_CACHE_DIR/demo-clip)")
    parser.add_argument("--force", action="store_true", help="retrain even if a complete backbone is there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dir", type=Path, help="pretrain on your own photos instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = pretrain_demo_backbone(args.out, seed=args.seed, force=args.force, real_dir=args.real_dir)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

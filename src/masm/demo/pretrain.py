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
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..errors import DataError
from ..models.backbones import demo_backbone_dir
from ..models.preprocessing import CLIP_MEAN, CLIP_STD
from .photos import EXTRA_TRAIN_PHOTOS, package_file

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
MASK_RATIO = 0.6  # share of the 8 x 8 px patches hidden in each crop (SimMIM)
NORM_PIX_EPS = 1e-4  # variance floor of the per-patch target normalisation (pixels in [0, 1])
VISIBLE_WEIGHT = 1.0  # weight of the visible patches' reconstruction next to the hidden ones' prediction
SUMMARY_WEIGHT = 1.0  # weight of the pooled feature's summary of the visible patches (detail map + thumbnail)
DETAIL_EPS = 1e-5  # floor of a patch's mean squared Laplacian before the log
DETAIL_MEAN, DETAIL_STD = -4.68, 2.40  # of that log over real crops (measured on 512 crops, seed 0)
# Structure probe only (not the objective): views with colour jitter and blur, as SimCLR makes them.
BASE_CROP = 96  # side of the crop the two views are cut from
VIEW_AREA = (0.35, 1.0)  # random resized crop: fraction of the base crop's area
VIEW_ASPECT = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness, contrast, saturation each x U(1 - JITTER, 1 + JITTER)
JITTER_P, GRAY_P, BLUR_P = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 1.5)
# One intra-op thread: the result then does not depend on the machine's core count, and on a shared or
# oversubscribed CPU two spinning OpenMP threads are many times slower than one (measured: 0.35 s vs
# 0.007 s for one colour jitter of a batch, with other jobs running).
THREADS = 1

# --- photos ----------------------------------------------------------------------------------------------
# Natural photographs that ship inside scikit-image's data folder (files, so no pooch download is needed).
SKIMAGE_COLOR_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
SKIMAGE_GRAY_PHOTOS = (
    "camera.png",
    "coins.png",
    "moon.png",
    "page.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)
LFW_FACES = "lfw_subset.npy"  # 200 grayscale 25 x 25 faces; one source whose crops pick a face at random
CROP_SIDE = (0.2, 1.0)  # crop side as a fraction of the photo's shorter side (log-uniform)
FACE_CROP_SIDE = (0.7, 1.0)  # faces are tiny: keep most of the face
MIN_CROP_STD = 4.0  # redraw (up to a few times) crops that are almost flat, e.g. retina's black border
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"

Source = tuple[str, list[np.ndarray]]  # a name and its images (HxWx3 uint8); a crop picks one at random


# =========================================================================================================
# Real photo crops


def real_photo_crops(n: int, size: int, seed: int, real_dir: str | Path | None = None) -> np.ndarray:
    """``n`` random square crops (random scale, position and flip) of real photos, resized to ``size``.

    The photos are scikit-image's bundled photographs (colour ones, gray ones as gray RGB, LFW faces) or,
    with ``real_dir``, every readable image under that folder. Returns ``(n, size, size, 3)`` uint8; the
    same ``seed`` always gives the same crops.
    """
    crops, _ = _crops_with_sources(n, size, np.random.default_rng(seed), photo_sources(real_dir))
    return crops


def photo_sources(real_dir: str | Path | None = None) -> list[Source]:
    """The photos crops are drawn from: scikit-image's bundled ones, or every image under ``real_dir``."""
    return _folder_sources(str(real_dir)) if real_dir is not None else _skimage_sources()


@functools.lru_cache(maxsize=1)
def _skimage_sources() -> list[Source]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    sources: list[Source] = []
    for name in SKIMAGE_COLOR_PHOTOS + SKIMAGE_GRAY_PHOTOS:
        if (folder / name).is_file():  # a trimmed install may lack some: use what is there
            sources.append((Path(name).stem, [np.asarray(Image.open(folder / name).convert("RGB"))]))
    for package, relative in EXTRA_TRAIN_PHOTOS:  # scikit-learn's photos stay unseen
        path = package_file(package, relative)
        if path is not None:
            sources.append((path.stem, [np.asarray(Image.open(path).convert("RGB"))]))
    if (folder / LFW_FACES).is_file():
        faces = np.load(folder / LFW_FACES)  # float in [0, 1], (200, 25, 25)
        faces = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)
        sources.append(("lfw_faces", [np.repeat(face[:, :, None], 3, axis=2) for face in faces]))
    if not sources:
        raise DataError(f"no photos found in scikit-image's data folder {folder}; pass real_dir instead")
    return sources


@functools.lru_cache(maxsize=4)
def _folder_sources(real_dir: str) -> list[Source]:
    folder = Path(real_dir)
    if not folder.is_dir():
        raise DataError(f"real_dir {folder} is not a folder")
    sources: list[Source] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                sources.append((str(path.relative_to(folder)), [np.asarray(image.convert("RGB"))]))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            logger.warning("skipping unreadable image %s: %s", path, err)
    if not sources:
        raise DataError(f"real_dir {folder} holds no readable images (suffixes {sorted(IMAGE_SUFFIXES)})")
    return sources


def _crops_with_sources(
    n: int, size: int, rng: np.random.Generator, sources: Sequence[Source]
) -> tuple[np.ndarray, np.ndarray]:
    """Crops and the index of the source each came from (the labels of the structure probe)."""
    crops = np.empty((n, size, size, 3), np.uint8)
    labels = rng.integers(len(sources), size=n)
    for i, label in enumerate(labels):
        name, images = sources[label]
        side_range = FACE_CROP_SIDE if name == "lfw_faces" else CROP_SIDE
        for _attempt in range(4):
            crop = _random_crop(images[rng.integers(len(images))], rng, size, side_range)
            if crop.std() >= MIN_CROP_STD:
                break
        crops[i] = crop
    return crops, labels


def _random_crop(
    photo: np.ndarray, rng: np.random.Generator, size: int, side_range: tuple[float, float]
) -> np.ndarray:
    height, width = photo.shape[:2]
    short = min(height, width)
    side = int(round(short * math.exp(rng.uniform(math.log(side_range[0]), math.log(side_range[1])))))
    side = min(short, max(side, 8))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resample = Image.Resampling.BICUBIC if side < size else Image.Resampling.BOX  # BOX: area average
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), resample))


# =========================================================================================================
# Augmentation (batched, in torch, driven by one seeded generator)


def to_model_input(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC crops (or float NCHW in [0, 1]) -> float32 NCHW normalised with CLIP's mean/std."""
    x = torch.as_tensor(crops)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_views(images: torch.Tensor, out_size: int, gen: torch.Generator) -> torch.Tensor:
    """One SimCLR view of each image (float NCHW in [0, 1]): resized crop, flip, jitter, gray, blur."""
    x = _random_resized_crop(images, out_size, gen)
    x = _color_jitter(x, gen)
    gray = _rand(len(x), gen) < GRAY_P
    x = torch.where(gray.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)
    blur = _rand(len(x), gen) < BLUR_P
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * _rand(len(x), gen)
    x = torch.where(blur.view(-1, 1, 1, 1), _gaussian_blur(x, sigma), x)
    return x.clamp(0, 1)


def _rand(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def _random_resized_crop(images: torch.Tensor, out_size: int, gen: torch.Generator) -> torch.Tensor:
    n = len(images)
    area = VIEW_AREA[0] + (VIEW_AREA[1] - VIEW_AREA[0]) * _rand(n, gen)
    log_aspect = math.log(VIEW_ASPECT[0]) + (math.log(VIEW_ASPECT[1]) - math.log(VIEW_ASPECT[0])) * _rand(
        n, gen
    )
    aspect = log_aspect.exp()
    # half-widths in normalised coordinates ([-1, 1] spans the image); the box stays inside the image
    half_w = (area * aspect).sqrt().clamp(max=1.0)
    half_h = (area / aspect).sqrt().clamp(max=1.0)
    center_x = (1 - half_w) * (2 * _rand(n, gen) - 1)
    center_y = (1 - half_h) * (2 * _rand(n, gen) - 1)
    flip = torch.where(_rand(n, gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    # downscaling by up to 1.5x: smooth first so bilinear sampling does not alias
    return F.grid_sample(F.avg_pool2d(images, 3, 1, 1), grid, mode="bilinear", align_corners=False)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


def _color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)

    def factor() -> torch.Tensor:
        return (1 - JITTER + 2 * JITTER * _rand(n, gen)).view(-1, 1, 1, 1)

    brightness, contrast, saturation = factor(), factor(), factor()
    jittered = (x * brightness).clamp(0, 1)
    mean = _luma(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = (mean + (jittered - mean) * contrast).clamp(0, 1)
    jittered = (_luma(jittered) + (jittered - _luma(jittered)) * saturation).clamp(0, 1)
    apply = _rand(n, gen) < JITTER_P
    return torch.where(apply.view(-1, 1, 1, 1), jittered, x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per-image Gaussian blur (separable, reflect padding) with a grouped convolution."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


# =========================================================================================================
# Pretraining


class PixelDecoder(nn.Module):
    """SimMIM's decoder: one linear map from each patch token (post-LayerNorm) to that patch's pixels, and
    one from the pooled feature to the summary of the visible patches (:func:`patch_summary`).

    Both are deliberately weak (linear), so the encoder itself must carry each patch's texture and the
    pooled feature a map of it; discarded after pretraining.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.patch = config.patch_size
        self.proj = nn.Linear(config.hidden_size, 3 * config.patch_size**2)
        patches = (config.image_size // config.patch_size) ** 2
        # pooled feature -> per patch: log detail energy (1) and mean colour (3)
        self.summary = nn.Linear(config.hidden_size, 4 * patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def _vision_tower(model: CLIPVisionModel) -> nn.Module:
    """The module holding ``post_layernorm`` (transformers 4 nests it under ``vision_model``, 5 does not)."""
    return getattr(model, "vision_model", model)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """NCHW -> (N, patches, 3·patch²), patches in row-major order (the ViT's token order)."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def random_patch_mask(n: int, patches: int, gen: torch.Generator) -> torch.Tensor:
    """(N, patches) bool: exactly ``round(MASK_RATIO · patches)`` masked patches per image."""
    count = round(MASK_RATIO * patches)
    order = torch.rand(n, patches, generator=gen).argsort(dim=1)
    return order < count


def masked_reconstruction_loss(
    model: CLIPVisionModel, decoder: PixelDecoder, images: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Masked image modelling on float NCHW images in [0, 1], with the visible patches reconstructed too.

    Hidden patches are set to the normalised input's zero (CLIP's mean colour) and predicted from the
    rest, as in SimMIM: that teaches context. Visible patches must be reconstructed as well, from the last
    layer: SimMIM alone lets the encoder drop what context cannot predict (measured: its features lose
    sensitivity to sensor noise, below a random network's), and that unpredictable fine detail is the
    evidence a forgery detector needs. Every target is the patch's own pixels normalised by its mean and
    standard deviation (MAE's normalised-pixel target), so the loss is about texture (edges, grain,
    noise, compression) rather than colour.
    """
    patch = model.config.patch_size
    grid = images.shape[-1] // patch
    mask = random_patch_mask(len(images), grid * grid, gen)
    pixel_mask = mask.view(-1, 1, grid, 1, grid, 1).expand(-1, 1, grid, patch, grid, patch)
    pixel_mask = pixel_mask.reshape(len(images), 1, grid * patch, grid * patch)
    inputs = to_model_input(images).masked_fill(pixel_mask, 0.0)
    output = model(pixel_values=inputs)
    prediction = decoder(_vision_tower(model).post_layernorm(output.last_hidden_state[:, 1:]))
    target = patchify(images, patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    per_patch = (prediction - target).pow(2).mean(-1)
    hidden_loss = (per_patch * mask).sum() / mask.sum()
    visible_loss = (per_patch * ~mask).sum() / (~mask).sum()
    summary = decoder.summary(output.pooler_output).view(len(images), -1, 4)
    per_patch = (summary - patch_summary(images, patch)).pow(2).mean(-1)
    summary_loss = (per_patch * ~mask).sum() / (~mask).sum()
    return hidden_loss + VISIBLE_WEIGHT * visible_loss + SUMMARY_WEIGHT * summary_loss


def patch_summary(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, patches, 4): each patch's log mean squared Laplacian of the luma (its fine detail: grain, edges,
    noise, blur) and its mean colour, both standardised; patches in token order.

    The pooled feature is trained to predict this map for the visible patches, so that it summarises
    where the fine detail and the colours of an image are, instead of being left untrained by pixel
    reconstruction (which only reads patch tokens).
    """
    luma = _luma(images)
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    detail = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), laplacian).pow(2)
    detail = (F.avg_pool2d(detail, patch).add(DETAIL_EPS).log() - DETAIL_MEAN) / DETAIL_STD
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    colour = (F.avg_pool2d(images, patch) - mean) / std
    return torch.cat([detail, colour], 1).flatten(2).transpose(1, 2)


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
            crops, _ = _crops_with_sources(batch_size, size, rng, sources)
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


# =========================================================================================================
# Evidence that pretraining created structure


@torch.no_grad()
def pooled_features(
    model: CLIPVisionModel, pixel_values: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """``pooler_output`` of ``model`` for normalised NCHW inputs, in eval mode."""
    model.eval()
    return torch.cat(
        [model(pixel_values=chunk).pooler_output for chunk in pixel_values.split(batch_size)]
    ).float()


def backbone_structure(
    model: CLIPVisionModel,
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_test: int = 500,
    n_retrieval: int = 256,
    top_k: int = 16,
) -> dict[str, float]:
    """How much structure a backbone has, in three numbers (compare against a random backbone):

    * ``source_probe_acc``: accuracy of a logistic-regression probe on the pooled features telling which
      scikit-image photo (of about 17) a colour-jittered crop came from; held-out crops.
    * ``view_retrieval_top1``: for 256 crops, how often the nearest pooled feature (cosine) of one
      augmented view is the other view of the same crop.
    * ``attn_top{k}_energy``: mean over all attention projections of the share of ``||W||_F^2`` in the top
      ``k`` singular values (a peaked spectrum: the principal directions MASM freezes carry more).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sources = _skimage_sources()
    size = model.config.image_size
    gen = torch.Generator().manual_seed(10_000 + seed)
    rng = np.random.default_rng([10_000, seed])

    crops, labels = _crops_with_sources(n_train + n_test, size, rng, sources)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    features = pooled_features(model, to_model_input(_color_jitter(images, gen))).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    probe.fit(features[:n_train], labels[:n_train])
    source_acc = float(probe.score(features[n_train:], labels[n_train:]))

    crops, _ = _crops_with_sources(n_retrieval, BASE_CROP, rng, sources)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    f1 = F.normalize(pooled_features(model, to_model_input(augment_views(images, size, gen))), dim=-1)
    f2 = F.normalize(pooled_features(model, to_model_input(augment_views(images, size, gen))), dim=-1)
    retrieval = float((f1 @ f2.T).argmax(dim=1).eq(torch.arange(n_retrieval)).float().mean())

    return {
        "source_probe_acc": round(source_acc, 4),
        "source_probe_chance": round(float(np.bincount(labels).max() / len(labels)), 4),
        "view_retrieval_top1": round(retrieval, 4),
        f"attn_top{top_k}_energy": round(attention_energy_share(model, top_k), 4),
    }


@torch.no_grad()
def attention_energy_share(model: nn.Module, top_k: int) -> float:
    """Mean share of the squared Frobenius norm in the top ``top_k`` singular values of q/k/v/out."""
    shares = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in {
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
        }:
            energy = torch.linalg.svdvals(module.weight.double()) ** 2
            shares.append(float(energy[:top_k].sum() / energy.sum()))
    return float(np.mean(shares))


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

"""Real photo crops: the photographs the demo backbone is pretrained on, and seeded random crops of them.

The photos are those that ship inside installed packages (scikit-image's data folder, matplotlib's sample
portrait; scikit-learn's two sample photos stay unseen, :mod:`masm.demo.photos`) or every readable image
of a folder. A crop is a random square (side log-uniform in a fraction of the photo's shorter side, random
position, random horizontal flip) resized to the model's input size. The draws are seeded and their order
is part of the recipe: the same seed must keep giving the same crops (and so the same backbone).

Also here: the two pixel conversions the objective and the structure probe share (:func:`to_model_input`,
:func:`to_luma`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..models.preprocessing import CLIP_MEAN, CLIP_STD
from .photos import EXTRA_TRAIN_PHOTOS, package_file

logger = logging.getLogger(__name__)

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

Source = tuple[str, list[np.ndarray]]  # a name and its images (HxWx3 uint8); a crop picks one at random


def real_photo_crops(n: int, size: int, seed: int, real_dir: str | Path | None = None) -> np.ndarray:
    """``n`` random square crops (random scale, position and flip) of real photos, resized to ``size``.

    The photos are scikit-image's bundled photographs (colour ones, gray ones as gray RGB, LFW faces) or,
    with ``real_dir``, every readable image under that folder. Returns ``(n, size, size, 3)`` uint8; the
    same ``seed`` always gives the same crops.
    """
    crops, _ = crops_with_sources(n, size, np.random.default_rng(seed), photo_sources(real_dir))
    return crops


def photo_sources(real_dir: str | Path | None = None) -> list[Source]:
    """The photos crops are drawn from: scikit-image's bundled ones, or every image under ``real_dir``."""
    return _folder_sources(str(real_dir)) if real_dir is not None else skimage_sources()


@functools.lru_cache(maxsize=1)
def skimage_sources() -> list[Source]:
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


def crops_with_sources(
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
# Pixel conversions shared by the objective and the structure probe


def to_model_input(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC crops (or float NCHW in [0, 1]) -> float32 NCHW normalised with CLIP's mean/std."""
    x = torch.as_tensor(crops)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def to_luma(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R BT.601 weights) of float NCHW RGB in [0, 1], as N1HW."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)

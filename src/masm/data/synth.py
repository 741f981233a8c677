"""Synthetic multi-forgery dataset: real photo crops and crops with one LOCAL manipulation each.

No deepfake dataset can be downloaded where MASM's demo and benchmarks run, yet they must show whether a
detector trained on some forgery families generalises to held-out ones. This module makes such a dataset
from ordinary photographs:

* real crops: random crops at random scales of the photos, resized to ``size``;
* fake crops: a real crop drawn the same way, then one family's manipulation inside a random soft region
  covering roughly 20-60 % of the crop (see :data:`FAMILIES`, made in :mod:`masm.data.synth_families`);
* both then go through the same global post-processing (mild colour jitter, a random global JPEG
  quality), so global statistics (means, histograms, contrast) do not separate the classes: only the local
  manipulation does.

The output is a plain folder dataset (``OUT/real/<id>.png``, ``OUT/fake/<family>/<id>.png``) plus
``OUT/synth.json`` with the parameters and counts; with ``masks=True`` also each fake's region as
``OUT/masks/<family>/<id>.png`` (8-bit, 255 = fully inside), which changes no crop. Every sample has its
own random generator derived from ``(seed, class, index)``, so a seed always gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from masm.errors import ConfigError, DataError

from .synth_families import (
    CROP_FRACTION,
    FAMILIES,
    JITTER,
    JPEG_PROBABILITY,
    JPEG_QUALITY,
    REGION_FRACTION,
    SampleContext,
    check_families,
    crop_of,
    forge,
    make_fake,
    make_fake_with_region,
    make_real,
    post_process,
    random_crop,
    random_region,
    to_uint8,
)

# The generator's names stay importable from here, where the demo, benchmarks and tests look for them.
__all__ = [
    "CROP_FRACTION",
    "FAMILIES",
    "JITTER",
    "JPEG_PROBABILITY",
    "JPEG_QUALITY",
    "REGION_FRACTION",
    "SKIMAGE_PHOTOS",
    "SampleContext",
    "check_families",
    "crop_of",
    "folder_photos",
    "forge",
    "make_fake",
    "make_fake_with_region",
    "make_real",
    "post_process",
    "random_crop",
    "random_region",
    "sample_rng",
    "skimage_photos",
    "synthesize",
    "to_uint8",
]

log = logging.getLogger(__name__)

# Natural colour photographs shipped inside scikit-image's data folder (no download needed). Grayscale
# ones (camera, coins, moon, ...) are left out: a colour manipulation on a gray crop would make the channel
# means alone a give-away. Illustrations and synthetic test images (logo, color, phantom, chessboard) and
# the fundus image (retina: mostly a black border) are left out too.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


# --------------------------------------------------------------------------------------------------------
# Source photos


def skimage_photos() -> list[np.ndarray]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = []
    for name in SKIMAGE_PHOTOS:
        path = folder / name
        if path.is_file():  # a trimmed scikit-image install may lack some; use what is there
            photos.append(np.asarray(Image.open(path).convert("RGB")))
    if not photos:
        raise DataError(f"no photos found in scikit-image's data folder {folder}; pass real_dir instead")
    return photos


def folder_photos(real_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """Every readable image under ``real_dir`` (sorted, recursive) and the files that could not be read."""
    if not real_dir.is_dir():
        raise DataError(f"real_dir {real_dir} is not a folder")
    photos, skipped = [], []
    for path in sorted(p for p in real_dir.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                photos.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            log.warning("skipping unreadable image %s: %s", path, err)
            skipped.append(str(path))
    if not photos:
        raise DataError(
            f"real_dir {real_dir} holds no readable images (suffixes {sorted(IMAGE_SUFFIXES)}; "
            f"{len(skipped)} unreadable)"
        )
    return photos, skipped


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """One generator per sample, so a sample does not depend on which others were made before it."""
    return np.random.default_rng([seed, stream, index])


# --------------------------------------------------------------------------------------------------------
# Dataset


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out_dir} is not empty (pass overwrite=True / --overwrite)")
        for name in ("real", "fake", "masks"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / "synth.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def synthesize(
    out_dir: str | Path,
    *,
    families: Sequence[str] | None = None,
    per_family: int = 200,
    num_real: int | None = None,
    size: int = 64,
    seed: int = 0,
    real_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    strength: float = 1.0,
    photos: Sequence[np.ndarray] | None = None,
    post: bool = True,
    masks: bool = False,
) -> dict:
    """Write a synthetic ``folder:`` dataset to ``out_dir`` and return its summary (also in ``synth.json``).

    ``families``: names from :data:`FAMILIES` (default: all). ``per_family``: fake crops per family.
    ``num_real``: real crops (default ``per_family * len(families)``, so the classes are balanced).
    ``size``: crop side in pixels. ``real_dir``: a folder of your own photos instead of scikit-image's.
    ``overwrite``: allow a non-empty ``out_dir`` (its ``real/``, ``fake/`` and ``synth.json`` are replaced).
    ``strength``: multiplies every family's artifact magnitude (noise level, colour shift, pattern
    amplitude, resampling factor, 1/JPEG quality; splicing has none). 1 gives subtle artifacts; small
    backbones trained for minutes (the demo) need more (the demo uses 5).
    ``photos``: the source photographs as arrays (instead of scikit-image's or ``real_dir``'s).
    ``post``: apply the shared global post-processing (``False`` writes raw real crops, e.g. as the real
    frames that pseudo-fakes are made from during training, which then post-process them themselves).
    ``masks``: also write each fake's forgery region to ``OUT/masks/<family>/<id>.png``.
    """
    if not 0 < strength <= 10:
        raise ConfigError(f"strength must be in (0, 10], got {strength}")
    chosen = check_families(families)
    if per_family < 0 or (num_real is not None and num_real < 0):
        raise ConfigError("per_family and num_real must be >= 0")
    if size < 16:
        raise ConfigError(f"size must be at least 16 px, got {size}")
    num_real = per_family * len(chosen) if num_real is None else num_real

    skipped: list[str] = []
    if photos is not None:
        photos, source = list(photos), {"arrays": len(photos)}
    elif real_dir is None:
        photos, source = skimage_photos(), {"skimage": list(SKIMAGE_PHOTOS)}
    else:
        photos, skipped = folder_photos(Path(real_dir))
        source = {"real_dir": str(real_dir)}

    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    (out_dir / "real").mkdir()
    for family in chosen:
        (out_dir / "fake" / family).mkdir(parents=True)
        if masks:
            (out_dir / "masks" / family).mkdir(parents=True)

    jobs = [("real", 0, i) for i in range(num_real)]
    for family in chosen:
        stream = 1 + list(FAMILIES).index(family)  # stable per family, whichever subset is chosen
        jobs += [(family, stream, i) for i in range(per_family)]
    bar = _progress(len(jobs), progress)
    for name, stream, index in jobs:
        rng = sample_rng(seed, stream, index)
        if name == "real":
            crop = make_real(photos, rng, size) if post else to_uint8(random_crop(photos, rng, size))
            save_png(crop, out_dir / "real" / f"{index:06d}.png")
        else:
            fake, region = make_fake_with_region(name, photos, rng, size, strength)
            save_png(fake, out_dir / "fake" / name / f"{index:06d}.png")
            if masks:
                save_png(to_uint8(region), out_dir / "masks" / name / f"{index:06d}.png")
        bar.update(1)
    bar.close()

    summary = {
        "format": "folder",
        "size": size,
        "seed": seed,
        "strength": strength,
        "families": chosen,
        "counts": {"real": num_real, "fake": {family: per_family for family in chosen}},
        "source": source,
        "photos": len(photos),
        "skipped_files": len(skipped),
        "skipped": skipped,
        "region_fraction": list(REGION_FRACTION),
        "crop_fraction": list(CROP_FRACTION),
        "jitter": JITTER,
        "jpeg_probability": JPEG_PROBABILITY,
        "jpeg_quality": list(JPEG_QUALITY),
        "post_processed": post,
        "masks": masks,
    }
    (out_dir / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="synth", unit="crop", file=sys.stderr, leave=False)

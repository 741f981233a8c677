"""The real colour photographs the offline demo is made from, all shipped inside installed packages.

Training photos (the demo backbone's pretraining and the detectors' real crops): scikit-image's colour
photographs (:data:`masm.data.synth.SKIMAGE_PHOTOS`) and matplotlib's sample portrait of Grace Hopper.
Unseen photos: scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``), used only to test
detectors on forgeries made from photos they never saw.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

EXTRA_TRAIN_PHOTOS = (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),)
UNSEEN_PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"))


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, or ``None`` when the package or file is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.is_file() else None


def _load(files) -> list[np.ndarray]:
    photos = []
    for package, relative in files:
        path = package_file(package, relative)
        if path is not None:
            photos.append(np.asarray(Image.open(path).convert("RGB")))
    return photos


@functools.lru_cache(maxsize=1)
def demo_photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(training photos, unseen photos)`` as uint8 RGB arrays."""
    from ..data.synth import skimage_photos

    train = skimage_photos() + _load(EXTRA_TRAIN_PHOTOS)
    unseen = _load(UNSEEN_PHOTOS)
    if not unseen:
        raise DataError("scikit-learn's sample photos (china.jpg, flower.jpg) are missing from its install")
    return train, unseen

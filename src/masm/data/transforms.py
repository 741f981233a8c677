"""Image transforms: RGB uint8 (H, W, 3) -> normalised float32 CHW tensor for a detector.

Training augmentation uses albumentations rather than torchvision v2: torchvision cannot be installed
beside this project's torch build, and albumentations works directly on numpy RGB uint8 arrays (what
:func:`masm.data.images.load_rgb` returns) with JPEG, noise and colour augmentations built in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from masm.models.preprocessing import Preprocessing

from .perturb import apply_perturbation
from .sampling import derive_seed


@dataclass
class AugmentConfig:
    """Training augmentation: each entry is the probability of that augmentation (0 switches it off)."""

    enabled: bool = field(default=True, metadata={"help": "apply augmentation to training images"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip"})
    brightness_contrast: float = field(default=0.5, metadata={"help": "brightness/contrast +-10%"})
    hue_saturation: float = field(default=0.3, metadata={"help": "hue/saturation/value shift"})
    jpeg: float = field(default=0.5, metadata={"help": "JPEG re-compression"})
    jpeg_quality: tuple[int, int] = field(default=(40, 100), metadata={"help": "JPEG quality range"})
    noise: float = field(default=0.2, metadata={"help": "Gaussian noise"})
    blur: float = field(default=0.2, metadata={"help": "Gaussian blur (kernel 3..7)"})
    downscale: float = field(default=0.1, metadata={"help": "downscale then upscale (resolution loss)"})
    gray: float = field(default=0.05, metadata={"help": "convert to grayscale"})


def build_augmentation(cfg: AugmentConfig):
    """An albumentations pipeline for ``cfg`` (``None`` when disabled)."""
    if not cfg.enabled:
        return None
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=cfg.brightness_contrast),
            A.HueSaturationValue(
                hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=cfg.hue_saturation
            ),
            A.ImageCompression(quality_range=tuple(cfg.jpeg_quality), p=cfg.jpeg),
            A.GaussNoise(std_range=(0.01, 0.05), p=cfg.noise),
            A.GaussianBlur(blur_limit=(3, 7), p=cfg.blur),
            A.Downscale(scale_range=(0.5, 0.9), p=cfg.downscale),
            A.ToGray(p=cfg.gray),
        ]
    )


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop to ``size`` x ``size`` (square inputs: plain resize)."""
    import cv2

    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    factor = size / min(h, w)
    new_w, new_h = max(size, round(w * factor)), max(size, round(h * factor))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    out = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return out[top : top + size, left : left + size]


class FrameTransform:
    """Callable ``rgb uint8 (H, W, 3) -> float32 (3, S, S)`` tensor; see :func:`build_transform`.

    ``key`` (the image path, passed by :class:`masm.data.dataset.FrameDataset`) seeds the perturbation per
    image; without it the run's seed is used as is.
    """

    def __init__(self, preprocessing: Preprocessing, augmentation=None, perturbation=None, seed: int = 0):
        self.size = preprocessing.input_size
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32) * 255.0
        self.std = np.asarray(preprocessing.std, dtype=np.float32) * 255.0
        self.augmentation = augmentation
        self.perturbation = perturbation
        self.seed = seed

    def __call__(self, rgb: np.ndarray, key: str | None = None) -> torch.Tensor:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        if self.perturbation is not None:
            name, level = self.perturbation
            seed = derive_seed(self.seed, key) if key is not None else self.seed
            rgb = apply_perturbation(rgb, name, level, seed)
        if self.augmentation is not None:
            rgb = self.augmentation(image=rgb)["image"]
        rgb = resize_square(rgb, self.size)
        arr = (rgb.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def build_transform(
    preprocessing: Preprocessing,
    *,
    train: bool,
    augment: AugmentConfig | None = None,
    perturbation: tuple[str, int] | None = None,
    seed: int = 0,
) -> FrameTransform:
    """The transform for a detector's ``preprocessing``: resize to ``input_size``, normalise by mean/std.

    ``train=True`` adds the augmentation of ``augment`` (default :class:`AugmentConfig`); ``perturbation``
    ``(name, level)`` applies a robustness perturbation first (evaluation), seeded per image by ``seed``
    and the image path.
    """
    augmentation = build_augmentation(augment or AugmentConfig()) if train else None
    if perturbation is not None:
        apply_perturbation(np.zeros((8, 8, 3), np.uint8), *perturbation)  # validate name and level early
    return FrameTransform(preprocessing, augmentation, perturbation, seed)

"""Image transforms: RGB uint8 (H, W, 3) -> normalised float32 CHW tensor for a detector.

Face detectors (and every detector without ``preprocessing.whole_image``) resize the short side to the
input size and keep the centre square; whole-image detectors crop or tile without resizing
(:mod:`masm.data.whole_image`).

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
from .whole_image import WholeImageAugmentation, center_crop, center_origin, tile_origins, tiles


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
    image; without it the run's seed is used as is. ``policy`` is how the image becomes the input: ``resize``
    (short side to ``S``, centre square), ``crop`` (the augmentation made the ``S`` x ``S`` crop already),
    ``center_crop`` or ``tiles`` (:mod:`masm.data.whole_image`); under ``tiles`` (``tiled``) the result is
    the stack of the image's tiles, ``(T, 3, S, S)``.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        augmentation=None,
        perturbation=None,
        seed: int = 0,
        policy: str = "resize",
    ):
        self.size = preprocessing.input_size
        self.policy = policy
        self.small_side = preprocessing.whole_image.small_side if preprocessing.whole_image else self.size
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32) * 255.0
        self.std = np.asarray(preprocessing.std, dtype=np.float32) * 255.0
        self.augmentation = augmentation
        self.perturbation = perturbation
        self.seed = seed
        # A masm.data.reencode.Reencoder, set by the caller: every image re-encoded alike before anything
        # else (training's data.align_format, eval's --bias-check), so the file format tells nothing.
        self.reencode = None

    def __call__(self, rgb: np.ndarray, key: str | None = None) -> torch.Tensor:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        if self.reencode is not None:
            rgb = self.reencode(rgb)
        if self.perturbation is not None:
            name, level = self.perturbation
            seed = derive_seed(self.seed, key) if key is not None else self.seed
            rgb = apply_perturbation(rgb, name, level, seed)
        if self.augmentation is not None:
            rgb = self.augmentation(image=rgb)["image"]
        if self.tiled:
            return torch.stack([self._normalise(tile) for tile in tiles(rgb, self.size)])
        if self.policy == "center_crop":
            return self._normalise(center_crop(rgb, self.size, self.small_side))
        return self._normalise(resize_square(rgb, self.size))  # "crop": already S x S, left as it is

    @property
    def tiled(self) -> bool:
        """Whether an image becomes several inputs (``(T, 3, S, S)``), whose scores are then combined."""
        return self.policy == "tiles"

    def crop_origins(self, height: int, width: int) -> list[tuple[int, int]] | None:
        """``(top, left)`` in the image of each input an image of ``height`` x ``width`` pixels gives
        (crops of the image repeated periodically, not resized); ``None`` for the ``resize`` policy."""
        if self.policy == "center_crop":
            return [center_origin(height, width, self.size, self.small_side)]
        if self.tiled:
            return tile_origins(height, width, self.size)
        return None

    def _normalise(self, rgb: np.ndarray) -> torch.Tensor:
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
    """The transform for a detector's ``preprocessing``: the input of ``input_size``, normalised by mean/std.

    ``train=True`` adds the augmentation of ``augment`` (default :class:`AugmentConfig`); ``perturbation``
    ``(name, level)`` applies a robustness perturbation first (evaluation), seeded per image by ``seed``
    and the image path. A whole-image detector (``preprocessing.whole_image``) takes its training recipe
    (random crop, flip, blur, JPEG) and its test policy from there; of ``augment`` only ``enabled``
    applies to it (off: the random crop stays, flip, blur and JPEG go).
    """
    augment = augment or AugmentConfig()
    whole = preprocessing.whole_image
    if perturbation is not None:
        apply_perturbation(np.zeros((8, 8, 3), np.uint8), *perturbation)  # validate name and level early
    if whole is None:
        augmentation = build_augmentation(augment) if train else None
        return FrameTransform(preprocessing, augmentation, perturbation, seed)
    if not train:
        return FrameTransform(preprocessing, None, perturbation, seed, policy=whole.test)
    crop = whole.train == "random_crop"
    augmentation = WholeImageAugmentation(
        whole, preprocessing.input_size, augment=augment.enabled, crop=crop, seed=seed
    )
    return FrameTransform(
        preprocessing, augmentation, perturbation, seed, policy="crop" if crop else "resize"
    )

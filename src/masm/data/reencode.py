"""Every image re-encoded the same way, so that real and fake cannot be told apart by their file format.

GenImage's reals are ImageNet JPEGs and its fakes lossless PNGs: a detector can learn "JPEG traces mean
real" and score well without seeing any generator's traces; giving both classes the same format moved
cross-generator accuracy by over 11 points ("Fake or JPEG?", Grommelt et al., arXiv 2403.17608).
:class:`Reencoder` is that one step, an encode-decode round trip of the decoded RGB image. A
:class:`masm.data.transforms.FrameTransform` applies it to every image first (``transform.reencode``),
before perturbations, augmentation and cropping: in training (``data.align_format``) and in ``masm eval
--bias-check``, which rescores every test set so and reports how far each metric moves.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from masm.errors import ConfigError

#: The formats images can be re-encoded to.
FORMATS = ("jpeg",)

#: JPEG quality of the re-encoding when none is given (high: the content survives, the format is JPEG).
DEFAULT_QUALITY = 95


@dataclass(frozen=True)
class Reencoder:
    """``rgb (H, W, 3) uint8 -> the same image encoded as ``format`` at ``quality`` and decoded again``."""

    format: str = "jpeg"
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown re-encoding format {self.format!r} (known: {', '.join(FORMATS)})")
        if (
            isinstance(self.quality, bool)
            or not isinstance(self.quality, int)
            or not 1 <= self.quality <= 100
        ):
            raise ConfigError(f"re-encoding quality must be an integer in 1..100, got {self.quality!r}")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        buffer = io.BytesIO()
        # PIL's defaults (4:2:0 chroma subsampling, standard tables) for every image alike: what matters is
        # that reals and fakes go through the same encoder, not which one it is.
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
            buffer, format="JPEG", quality=self.quality
        )
        buffer.seek(0)
        with Image.open(buffer) as image:
            return np.asarray(image.convert("RGB"))

    def describe(self) -> str:
        """``"JPEG quality 95"``: how the reports name it."""
        return f"{self.format.upper()} quality {self.quality}"

    def as_dict(self) -> dict[str, object]:
        return {"format": self.format, "quality": self.quality}


def format_aligner(fmt: str | None, quality: int = DEFAULT_QUALITY) -> Reencoder | None:
    """The :class:`Reencoder` of a config's ``align_format`` (``None``: images stay as they were decoded)."""
    return None if fmt is None else Reencoder(fmt, quality)

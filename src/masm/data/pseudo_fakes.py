"""Pseudo-fakes made on the fly from real frames: train a detector from real images alone.

Self-blended images (SBI, Shiohara & Yamasaki, CVPR 2022) showed that the strongest training signal for
face-forgery detectors that must generalise is not a particular forgery method but its *traces*: a region
of a real face replaced by a slightly altered copy of itself leaves the blending boundary, colour and
sharpness mismatches and landmark-shaped seams that every face swap leaves too. This module makes such
forgeries during training, so the training set is every real frame times an endless stream of
manipulations instead of a fixed folder of fakes.

A real training frame becomes, with probability ``probability``, a pseudo-fake (label 1) of one of the
configured ``families`` (the local forgery families of :mod:`masm.data.synth_families`; ``blend`` is SBI's
self-blending). The manipulated region follows the face where the frame holds one (``region: auto``:
the convex hull of dlib's 68 landmarks, randomly grown or shrunk and feathered, as in SBI) and is a random
soft blob otherwise. With ``post_process`` every training frame, real or fake, goes through the same
global colour jitter and JPEG quality, so that global statistics cannot separate the classes (used on
uncompressed photo crops; real video frames already carry their own compression).

Every decision comes from the generator the caller passes, which the trainer seeds by
``(run seed, epoch, sample index)``: a run is reproducible and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from masm.errors import ConfigError

from . import synth_families


@dataclass
class PseudoFakeConfig:
    """Forgeries generated on the fly from real training frames (off while ``probability`` is 0)."""

    probability: float = field(
        default=0.0, metadata={"help": "chance a real training frame becomes a pseudo-fake (0 = off)"}
    )
    families: list[str] = field(
        default_factory=lambda: ["blend"],
        metadata={"help": f"forgery families drawn uniformly, from: {', '.join(synth_families.FAMILIES)}"},
    )
    strength: float = field(default=1.0, metadata={"help": "artifact magnitude (1 = subtle, 3 = strong)"})
    region: Literal["auto", "face", "random"] = field(
        default="auto",
        metadata={
            "help": "auto: the face's landmark hull where dlib finds a face, else a random blob; "
            "face: landmark hull only (a frame without a face stays real); random: a random blob"
        },
    )
    real_only: bool = field(
        default=False,
        metadata={"help": "drop the training set's own fakes: learn from real frames alone, as SBI does"},
    )
    post_process: bool = field(
        default=False,
        metadata={"help": "same global colour jitter + JPEG for every training frame, real or fake"},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"pseudo_fakes.probability must be in [0, 1], got {self.probability}")
        if not 0 < self.strength <= 10:
            raise ConfigError(f"pseudo_fakes.strength must be in (0, 10], got {self.strength}")
        self.families = synth_families.check_families(self.families)

    @property
    def enabled(self) -> bool:
        return self.probability > 0


class PseudoFakeMaker:
    """``maker(rgb, rng) -> (rgb, label, family)`` for square uint8 RGB frames.

    ``donors`` is a sequence of other real images (uint8 RGB, any size; may load lazily) that the
    ``splice`` family takes its pasted regions from.
    """

    def __init__(self, config: PseudoFakeConfig, donors: Sequence[np.ndarray] = ()):
        self.config = config
        self.donors = donors
        if "splice" in config.families and len(donors) == 0:
            raise ConfigError("pseudo_fakes family 'splice' needs other real images to take regions from")
        self._landmarks = None
        if config.region in ("auto", "face"):
            from .faces import LandmarkFinder

            self._landmarks = LandmarkFinder(required=config.region == "face")

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, str | None]:
        height, width = rgb.shape[:2]
        if height != width:
            raise ValueError(f"pseudo-fakes are made on square frames, got {width}x{height}")
        cfg = self.config
        make_fake = rng.random() < cfg.probability
        family = cfg.families[rng.integers(len(cfg.families))] if make_fake else None
        image = rgb.astype(np.float32) / 255.0
        label = 0
        if make_fake:
            region = self._region(rgb, rng)
            if region is not None:
                image = synth_families.forge(image, family, region, rng, self.donors, cfg.strength)
                label = 1
            else:
                family = None
        if cfg.post_process:
            return synth_families.post_process(image, rng), label, family
        return synth_families.to_uint8(image), label, family

    def _region(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        size = rgb.shape[0]
        if self._landmarks is not None:
            points = self._landmarks(rgb)
            if points is not None:
                return face_region(points, size, rng)
            if self.config.region == "face":
                return None
        return synth_families.random_region(rng, size)


def face_region(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """SBI's blending mask: the landmarks' convex hull, grown or shrunk at random, then feathered."""
    import cv2

    hull = cv2.convexHull(np.round(points).astype(np.int32))
    mask = np.zeros((size, size), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0)
    kernel = max(1, int(round(size * rng.uniform(0.01, 0.06))))
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kernel + 1, 2 * kernel + 1))
    mask = cv2.dilate(mask, element) if rng.random() < 0.5 else cv2.erode(mask, element)
    if mask.max() == 0:  # eroded away on a tiny face: keep the hull itself
        cv2.fillConvexPoly(mask, hull, 1.0)
    sigma = rng.uniform(0.01, 0.04) * size
    return cv2.GaussianBlur(mask, (0, 0), sigma)[..., None]

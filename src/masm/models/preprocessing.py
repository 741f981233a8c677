"""Preprocessing that travels with a detector, so a checkpoint knows its own input format."""

from __future__ import annotations

from dataclasses import dataclass, field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FaceCropConfig:
    """How faces are cut out of frames before the model sees them (DeepfakeBench's defaults)."""

    size: int = field(default=256, metadata={"help": "side of the aligned face crop in pixels"})
    scale: float = field(
        default=1.3, metadata={"help": "margin: crop side / face size of the ArcFace template"}
    )


@dataclass
class Preprocessing:
    """Input contract of a detector: RGB image -> resize to ``input_size`` -> normalise by mean/std."""

    input_size: int = field(default=224, metadata={"help": "side of the square model input in pixels"})
    mean: tuple[float, float, float] = field(default=CLIP_MEAN, metadata={"help": "per-channel RGB mean"})
    std: tuple[float, float, float] = field(default=CLIP_STD, metadata={"help": "per-channel RGB std"})
    face_crop: FaceCropConfig | None = field(
        default_factory=FaceCropConfig,
        metadata={"help": "face alignment used for training data; null = whole images"},
    )

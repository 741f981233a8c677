"""Preprocessing that travels with a detector, so a checkpoint knows its own input format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import SettingsError

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
class WholeImageConfig:
    """How a whole image of any size becomes the model input (AI-generated image detectors).

    The field's recipe (CNNDetection, UniversalFakeDetect, Effort on GenImage/UFD): an image is never
    resized, since resizing smooths away the generator's high-frequency traces; the model sees a crop of
    ``input_size`` pixels at the image's own resolution.
    """

    train: Literal["random_crop", "resize"] = field(
        default="random_crop",
        metadata={
            "help": "training input: random_crop = a random input-size crop (an image smaller than the "
            "input is first resized up, short side to the input size); resize = short side resized to the "
            "input size, centre crop (as face detectors)"
        },
    )
    test: Literal["center_crop", "resize", "tiles"] = field(
        default="center_crop",
        metadata={
            "help": "evaluation and detection input: center_crop = the centre input-size crop, no resize, a "
            "side under small_side repeated periodically up to it first (Effort's UniversalFakeDetect "
            "evaluation); resize = short side resized to the input size, centre crop; tiles = the mean "
            "score of input-size tiles covering the whole image"
        },
    )
    small_side: int = field(
        default=256,
        metadata={
            "help": "center_crop: an image side shorter than this is repeated periodically up to it before "
            "the centre crop (Effort: 256 for an input of 224); at least input_size"
        },
    )
    hflip: float = field(default=0.5, metadata={"help": "training: probability of a horizontal flip"})
    blur_prob: float = field(
        default=0.1, metadata={"help": "training: probability of a Gaussian blur (CNNDetection: 0.1)"}
    )
    blur_sigma: tuple[float, float] = field(
        default=(0.0, 3.0), metadata={"help": "training: blur sigma drawn uniformly from this range"}
    )
    jpeg_prob: float = field(
        default=0.1, metadata={"help": "training: probability of a JPEG re-compression (CNNDetection: 0.1)"}
    )
    jpeg_quality: tuple[int, int] = field(
        default=(30, 100), metadata={"help": "training: JPEG quality drawn uniformly from this range"}
    )

    def __post_init__(self) -> None:
        bad = [name for name in ("hflip", "blur_prob", "jpeg_prob") if not 0.0 <= getattr(self, name) <= 1.0]
        if bad:
            raise SettingsError(bad, "a probability must lie in [0, 1]")
        low, high = self.blur_sigma
        if not 0.0 <= low <= high:
            raise SettingsError(["blur_sigma"], f"need 0 <= low <= high (got {list(self.blur_sigma)})")
        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 100:
            raise SettingsError(
                ["jpeg_quality"], f"need 1 <= low <= high <= 100 (got {list(self.jpeg_quality)})"
            )


@dataclass
class Preprocessing:
    """Input contract of a detector: RGB image -> model input of ``input_size`` -> normalise by mean/std.

    Without ``whole_image`` (face detectors, every checkpoint written before it existed) the image's short
    side is resized to ``input_size`` and the centre square kept; ``whole_image`` says otherwise.
    """

    input_size: int = field(default=224, metadata={"help": "side of the square model input in pixels"})
    mean: tuple[float, float, float] = field(default=CLIP_MEAN, metadata={"help": "per-channel RGB mean"})
    std: tuple[float, float, float] = field(default=CLIP_STD, metadata={"help": "per-channel RGB std"})
    face_crop: FaceCropConfig | None = field(
        default_factory=FaceCropConfig,
        metadata={"help": "face alignment used for training data; null = whole images"},
    )
    whole_image: WholeImageConfig | None = field(
        default=None,
        metadata={
            "help": "how whole images of any size become the input (crops, tiles, augmentation); "
            "null = resize the short side to input_size and keep the centre square"
        },
    )

    def __post_init__(self) -> None:
        if self.whole_image is not None and self.whole_image.small_side < self.input_size:
            raise SettingsError(
                ["whole_image.small_side"],
                f"must be at least input_size ({self.whole_image.small_side} < {self.input_size})",
            )

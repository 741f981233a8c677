"""How one synthetic forgery is made: a crop, a soft region, one family's LOCAL manipulation inside it.

The forgery families (:data:`FAMILIES`: blending, splicing, resampling, noise, double JPEG, an upsampler's
fingerprint) each turn a float crop and a region into a manipulated crop; :func:`forge` applies one. Around
them: random crops of photos and random regions (what a family works on) and the global post-processing
that real and fake crops share, so that only the local manipulation separates the classes. Both
``masm synth`` (:mod:`masm.data.synth`, which writes fixed data sets) and the pseudo-fakes made on the fly
during training (:mod:`masm.data.pseudo_fakes`) draw from here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from masm.errors import ConfigError

# Region of the manipulation, as a fraction of the crop's area (hard mask, before feathering).
REGION_FRACTION = (0.2, 0.6)
# Real crops: side of the square cut from the photo, as a fraction of the photo's shorter side.
CROP_FRACTION = (0.15, 0.8)
# Global post-processing, identical for real and fake crops.
JITTER = 0.06  # brightness, contrast and saturation each scaled by 1 +- JITTER
JPEG_PROBABILITY = 0.6  # the others stay losslessly stored, as many real images are
JPEG_QUALITY = (85, 98)  # global JPEG quality, uniform

Image32 = np.ndarray  # float32 H x W x 3 in [0, 1]
Family = Callable[[Image32, np.ndarray, "SampleContext"], Image32]


@dataclass
class SampleContext:
    """What a family may draw on besides the crop and its region: randomness and other photos."""

    rng: np.random.Generator
    photos: Sequence[np.ndarray]
    size: int
    strength: float = 1.0  # scales each family's artifact magnitude (1 = the subtle defaults)


# --------------------------------------------------------------------------------------------------------
# Crops and regions


def random_crop(photos: Sequence[np.ndarray], rng: np.random.Generator, size: int) -> Image32:
    """A square crop at a random place and scale of a random photo, resized to ``size``."""
    return crop_of(photos[rng.integers(len(photos))], rng, size)


def crop_of(photo: np.ndarray, rng: np.random.Generator, size: int, fraction: float | None = None) -> Image32:
    """A square crop of ``photo`` at a random place, its side ``fraction`` of the photo's shorter side
    (default: random in CROP_FRACTION), resized to ``size``; float32 in [0, 1]."""
    height, width = photo.shape[:2]
    short = min(height, width)
    fraction = rng.uniform(*CROP_FRACTION) if fraction is None else fraction
    side = int(round(short * fraction))
    side = min(short, max(side, min(size, short), 8))
    top = rng.integers(height - side + 1)
    left = rng.integers(width - side + 1)
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_CUBIC
    crop = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interpolation)
    return crop.astype(np.float32) / 255.0


def random_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft blob (a wobbly rotated ellipse, feathered) covering 20-60 % of the crop; H x W x 1 in [0, 1]."""
    target = rng.uniform(*REGION_FRACTION)
    aspect = rng.uniform(0.5, 2.0)
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.3, 0.7, size=2) * size
    harmonics = rng.uniform(-0.12, 0.12, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx - centre[1]) * np.cos(angle) + (yy - centre[0]) * np.sin(angle)
    v = -(xx - centre[1]) * np.sin(angle) + (yy - centre[0]) * np.cos(angle)
    theta = np.arctan2(v, u)
    boundary = 1.0 + sum(h * np.cos((k + 2) * theta + p) for k, (h, p) in enumerate(zip(harmonics, phases)))

    radius = size * np.sqrt(target / np.pi)  # the ellipse's area before clipping at the crop's border
    for _ in range(4):  # grow until the part inside the crop has the target area
        a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        hard = np.sqrt((u / a) ** 2 + (v / b) ** 2) < boundary
        fraction = max(hard.mean(), 1e-3)
        if fraction >= 0.9 * target:
            break
        radius *= np.sqrt(target / fraction)
    sigma = rng.uniform(0.8, 2.0) * size / 64
    soft = cv2.GaussianBlur(hard.astype(np.float32), (0, 0), sigma)
    return soft[..., None]


# --------------------------------------------------------------------------------------------------------
# Forgery families: (crop, region, context) -> manipulated crop, all float32 in [0, 1].


def paste(image: Image32, source: Image32, region: np.ndarray) -> Image32:
    return image * (1 - region) + source * region


def blend(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """Self-blending: the same crop, colour-shifted, slightly blurred or sharpened and shifted by a pixel or
    two, blended back under the soft region (as in self-blended images, SBI)."""
    rng = ctx.rng
    st = ctx.strength
    source = (
        image * rng.uniform(1 - 0.06 * st, 1 + 0.06 * st, size=3) + rng.uniform(-0.025, 0.025, size=3) * st
    )
    sigma = rng.uniform(0.6, 1.1)
    blurred = cv2.GaussianBlur(source, (0, 0), sigma)
    source = blurred if rng.random() < 0.5 else source + rng.uniform(0.5, 1.0) * (source - blurred)
    scale = rng.uniform(0.97, 1.03)
    shift = rng.uniform(-1.5, 1.5, size=2) * st
    centre = ctx.size / 2
    matrix = np.float32(
        [[scale, 0, centre * (1 - scale) + shift[0]], [0, scale, centre * (1 - scale) + shift[1]]]
    )
    source = cv2.warpAffine(
        source.astype(np.float32), matrix, (ctx.size, ctx.size), borderMode=cv2.BORDER_REFLECT
    )
    return paste(image, source, region)


def splice(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """A region from another photo pasted in with a soft edge, its per-channel histogram matched to what it
    covers (as a face swap is colour-corrected): the evidence is a patch whose sharpness, noise and texture
    do not belong to the rest of the crop, and its seam. Without the matching the histogram of the mixture
    alone gives it away."""
    # The donor is cut at a scale that needs no upsampling, so its texture is as sharp as a real crop's,
    # whether donors are large photos (masm synth) or crops already at the frame size (pseudo-fakes).
    photo = ctx.photos[ctx.rng.integers(len(ctx.photos))]
    least = min(1.0, ctx.size / min(photo.shape[:2]))
    donor = crop_of(photo, ctx.rng, ctx.size, max(least, ctx.rng.uniform(*CROP_FRACTION)))
    inside = region[..., 0] > 0.5
    quantiles = np.linspace(0, 1, 33)
    matched = np.empty_like(donor)
    for c in range(3):
        donor_q = np.quantile(donor[..., c][inside], quantiles)
        covered_q = np.quantile(image[..., c][inside], quantiles)
        matched[..., c] = np.interp(donor[..., c], donor_q + np.arange(33) * 1e-6, covered_q)
    return paste(image, matched, region)


def resample(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """A region down- and re-up-sampled: the high frequencies are gone and interpolation leaves its
    periodic correlations."""
    rng = ctx.rng
    factor = 1 + (rng.uniform(1.5, 2.5) - 1) * ctx.strength
    small = max(4, int(round(ctx.size / factor)))
    down = cv2.resize(
        image, (small, small), interpolation=[cv2.INTER_AREA, cv2.INTER_LINEAR][rng.integers(2)]
    )
    up = cv2.resize(
        down, (ctx.size, ctx.size), interpolation=[cv2.INTER_LINEAR, cv2.INTER_CUBIC][rng.integers(2)]
    )
    return paste(image, up, region)


def noise(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """Local noise inconsistency: the region denoised, or given another sensor's noise."""
    rng = ctx.rng
    if rng.random() < 0.4:
        source = cv2.medianBlur(image, 3)
    else:
        sigma = rng.uniform(4.0, 8.0) / 255 * ctx.strength
        luma = rng.normal(0, sigma, size=image.shape[:2] + (1,))
        chroma = rng.normal(0, sigma * rng.uniform(0.2, 0.6), size=image.shape)
        source = image + (luma + chroma).astype(np.float32)
    return paste(image, source, region)


def double_jpeg(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """A region JPEG-compressed at another quality on an 8x8 grid misaligned with the crop's."""
    rng = ctx.rng
    dy, dx = rng.integers(1, 8, size=2)
    padded = np.pad(image, ((dy, 8), (dx, 8), (0, 0)), mode="reflect")
    compressed = jpeg(padded, max(5, int(rng.integers(40, 76) / ctx.strength)))
    return paste(image, compressed[dy : dy + ctx.size, dx : dx + ctx.size], region)


def fingerprint(image: Image32, region: np.ndarray, ctx: SampleContext) -> Image32:
    """A faint periodic pattern, as a transposed-convolution upsampler leaves (a checkerboard with period 2
    or 4), its strength following the local brightness."""
    rng = ctx.rng
    period = int(rng.choice([2, 4]))
    tile = rng.normal(size=(period, period, 3)).astype(np.float32)
    tile[..., 1:] = tile[..., :1] * 0.7 + tile[..., 1:] * 0.3  # mostly the same in every channel
    tile -= tile.mean(axis=(0, 1))
    tile /= np.abs(tile).max() + 1e-6
    reps = -(-ctx.size // period)
    pattern = np.tile(tile, (reps, reps, 1))[: ctx.size, : ctx.size]
    amplitude = rng.uniform(2.5, 5.0) / 255 * ctx.strength
    return image + region * pattern * amplitude * (0.5 + image)


FAMILIES: dict[str, Family] = {
    "blend": blend,
    "splice": splice,
    "resample": resample,
    "noise": noise,
    "double_jpeg": double_jpeg,
    "fingerprint": fingerprint,
}


def check_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    chosen = [name.strip() for name in families if name.strip()]
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown or not chosen:
        raise ConfigError(
            f"unknown forgery famil{'ies' if len(unknown) > 1 else 'y'} {unknown or 'none given'}; "
            f"known: {', '.join(FAMILIES)}"
        )
    return list(dict.fromkeys(chosen))


# --------------------------------------------------------------------------------------------------------
# Global post-processing, the same for every crop


def jpeg(image: Image32, quality: int) -> Image32:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB")).astype(np.float32) / 255.0


def to_uint8(image: Image32) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def post_process(image: Image32, rng: np.random.Generator) -> np.ndarray:
    """Mild global colour jitter then a random global JPEG quality; returns uint8 RGB."""
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    gray = image.mean(axis=2, keepdims=True)
    image = gray + saturation * (image - gray)
    image = image.mean() + contrast * (image - image.mean())
    image = np.clip(image * brightness, 0.0, 1.0)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return to_uint8(jpeg(image, quality) if rng.random() < JPEG_PROBABILITY else image)


# --------------------------------------------------------------------------------------------------------
# Whole samples: a crop, forged or not, then post-processed


def make_real(photos: Sequence[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    return post_process(random_crop(photos, rng, size), rng)


def forge(
    image: Image32,
    family: str,
    region: np.ndarray,
    rng: np.random.Generator,
    donors: Sequence[np.ndarray],
    strength: float = 1.0,
) -> Image32:
    """``family``'s manipulation of a square float crop inside ``region``, clipped to [0, 1].

    The one forging step of both ``masm synth`` (fixed sets) and on-the-fly pseudo-fakes
    (:mod:`masm.data.pseudo_fakes`); ``donors`` are the other real images ``splice`` cuts from.
    """
    context = SampleContext(rng=rng, photos=donors, size=image.shape[0], strength=strength)
    return np.clip(FAMILIES[family](image, region, context), 0.0, 1.0).astype(np.float32)


def make_fake(
    family: str, photos: Sequence[np.ndarray], rng: np.random.Generator, size: int, strength: float = 1.0
) -> np.ndarray:
    return make_fake_with_region(family, photos, rng, size, strength)[0]


def make_fake_with_region(
    family: str, photos: Sequence[np.ndarray], rng: np.random.Generator, size: int, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A fake crop (uint8 RGB) and the region it was forged in (float32 H x W in [0, 1], feathered).

    The region is where the forgery really is: explanation maps are scored against it. Post-processing is
    global and keeps the geometry, so the region holds for the final crop.
    """
    image = random_crop(photos, rng, size)
    region = random_region(rng, size)
    return post_process(forge(image, family, region, rng, photos, strength), rng), region[..., 0]

"""Robustness perturbations for evaluation, each at 5 severity levels (1 mild ... 5 strong).

``apply_perturbation(rgb, name, level, seed)`` is deterministic for a given seed; evaluation derives the
seed per image from the run's seed and the image path (:func:`masm.data.sampling.derive_seed`), so every
image gets its own noise, and the same noise in every run. Level parameters rise strictly, so the damage
(e.g. PSNR against the original) rises with the level.
"""

from __future__ import annotations

import io

import numpy as np

from masm.errors import ConfigError

LEVELS = (1, 2, 3, 4, 5)
# Parameter per level; the order of the tuple is the severity order.
JPEG_QUALITY = (80, 60, 40, 20, 10)
BLUR_SIGMA = (1.0, 2.0, 3.0, 4.5, 6.0)
NOISE_STD = (5.0, 10.0, 15.0, 20.0, 30.0)  # in 0..255 units
CONTRAST_FACTOR = (0.8, 0.65, 0.5, 0.35, 0.2)  # blend towards the mean grey
SATURATION_FACTOR = (0.8, 0.6, 0.4, 0.2, 0.0)  # blend towards grey
PIXELATE_FACTOR = (0.6, 0.45, 0.33, 0.25, 0.18)  # downscale ratio before nearest-neighbour upscaling
OCCLUSION_AREA = (0.04, 0.08, 0.12, 0.18, 0.25)  # fraction of the image covered by one block
H264_CRF = (24, 30, 36, 42, 48)


def _jpeg(rgb, level, rng):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY[level - 1])
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _blur(rgb, level, rng):
    import cv2

    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=BLUR_SIGMA[level - 1], borderType=cv2.BORDER_REFLECT)


def _noise(rgb, level, rng):
    noise = rng.normal(0.0, NOISE_STD[level - 1], size=rgb.shape)
    return np.clip(rgb.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def _gray(rgb):
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _contrast(rgb, level, rng):
    factor = CONTRAST_FACTOR[level - 1]
    mean = _gray(rgb).mean()
    return np.clip(mean + factor * (rgb.astype(np.float64) - mean), 0, 255).round().astype(np.uint8)


def _saturation(rgb, level, rng):
    factor = SATURATION_FACTOR[level - 1]
    gray = _gray(rgb)[:, :, None]
    return np.clip(gray + factor * (rgb.astype(np.float64) - gray), 0, 255).round().astype(np.uint8)


def _pixelate(rgb, level, rng):
    import cv2

    h, w = rgb.shape[:2]
    f = PIXELATE_FACTOR[level - 1]
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _occlusion(rgb, level, rng):
    # Position and colour depend on the seed only, so the blocks of rising levels are nested.
    h, w = rgb.shape[:2]
    half_max = np.sqrt(OCCLUSION_AREA[-1] * h * w) / 2
    cy = rng.uniform(min(half_max, h / 2), max(h - half_max, h / 2))
    cx = rng.uniform(min(half_max, w / 2), max(w - half_max, w / 2))
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    half = np.sqrt(OCCLUSION_AREA[level - 1] * h * w) / 2
    y0, y1 = max(0, round(cy - half)), min(h, max(round(cy + half), round(cy - half) + 1))
    x0, x1 = max(0, round(cx - half)), min(w, max(round(cx + half), round(cx - half) + 1))
    out = rgb.copy()
    out[y0:y1, x0:x1] = colour
    return out


def _h264(rgb, level, rng):
    """Encode as a 2-frame H.264 clip (libx264, CRF by level) and decode the first frame back."""
    import av

    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sides
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = padded.shape[1], padded.shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(H264_CRF[level - 1]), "preset": "veryfast", "threads": "1"}
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    with av.open(buf, format="h264") as container:
        frame = next(container.decode(video=0))
        decoded = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(decoded[:h, :w])


_FUNCTIONS = {
    "jpeg": _jpeg,
    "blur": _blur,
    "noise": _noise,
    "contrast": _contrast,
    "saturation": _saturation,
    "pixelate": _pixelate,
    "occlusion": _occlusion,
    "h264": _h264,
}
PERTURBATIONS: tuple[str, ...] = tuple(_FUNCTIONS)


def apply_perturbation(rgb: np.ndarray, name: str, level: int, seed: int = 0) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 perturbed by ``name`` at ``level`` 1..5; deterministic for ``seed``."""
    if name not in _FUNCTIONS:
        raise ConfigError(f"unknown perturbation {name!r} (known: {', '.join(PERTURBATIONS)})")
    if level not in LEVELS:
        raise ConfigError(f"perturbation {name}: level must be 1..5, got {level!r}")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    return _FUNCTIONS[name](rgb, level, np.random.default_rng(seed))


def parse_perturbation(text: str) -> list[tuple[str, int]]:
    """``"jpeg:3"`` -> ``[("jpeg", 3)]``; ``"jpeg"`` -> its 5 levels; ``"all"`` -> every name x level;
    comma-separated lists combine; ``""`` / ``"none"`` -> ``[]``."""
    out: list[tuple[str, int]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item or item == "none":
            continue
        if item == "all":
            out += [(n, lv) for n in PERTURBATIONS for lv in LEVELS]
            continue
        name, sep, level = item.partition(":")
        if name not in _FUNCTIONS:
            raise ConfigError(
                f"unknown perturbation {name!r} in {text!r} (known: {', '.join(PERTURBATIONS)}, all)"
            )
        if not sep:
            out += [(name, lv) for lv in LEVELS]
            continue
        if not level.isdigit() or int(level) not in LEVELS:
            raise ConfigError(f"perturbation {item!r}: level must be 1..5")
        out.append((name, int(level)))
    return out

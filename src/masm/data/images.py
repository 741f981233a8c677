"""Safe image loading and content-based file type detection.

:func:`load_rgb` turns anything PIL can open into an RGB ``uint8`` array or raises a :class:`DataError`
naming the file: zero-byte, truncated and non-image files, decompression bombs (refused from the header,
before any pixel is decoded), 16-bit, palette, alpha, grayscale, CMYK and EXIF-rotated images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from masm.errors import DataError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` RGB ``uint8`` array.

    Alpha is composited on black; 16-bit samples are scaled to 8 bits; palette, grayscale and CMYK images
    are converted; EXIF orientation is applied. An image whose header declares more than ``max_pixels``
    pixels is refused before decoding. Every failure is a :class:`DataError` naming ``path``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err.strerror or err})") from None
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DataError(
                        f"{path}: image of {width}x{height} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb); refused without decoding"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb_array(im)
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: refused as a possible decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (PIL cannot identify the format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from None


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:4] / 255.0)  # composite on black
        return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    if mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def is_image_file(path: str | Path) -> bool:
    """True if ``path`` holds an image, judged by content (magic bytes, else PIL), not by its name."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    if not head:
        return False
    if any(head.startswith(m) for m in _IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.verify()
        return True
    except Exception:  # PIL raises many types for non-images; any of them means "not an image"
        return False


def is_video_file(path: str | Path) -> bool:
    """True if ``path`` holds a video stream that PyAV can open (images are not videos)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0 or is_image_file(path):
        return False
    import av

    try:
        with av.open(str(path)) as container:
            # FFmpeg's still-image demuxers (image2, *_pipe) accept almost any file named like an image,
            # text included; what they open is not a video.
            fmt = container.format.name
            if fmt == "image2" or fmt.endswith("_pipe"):
                return False
            return len(container.streams.video) > 0
    except (av.FFmpegError, OSError, ValueError):
        return False

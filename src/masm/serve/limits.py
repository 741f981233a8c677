"""What an upload is, judged by its content, and whether it is within the limits, before it is decoded.

Everything here reads headers only: an image's declared size (a decompression bomb is refused before one
pixel is decoded), a video's stream, resolution, duration and frame count (packets are counted, not
decoded). What passes is then decoded by the same code as ``masm detect``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from masm.data.images import is_image_file
from masm.data.video import stream_frame_count
from masm.inference.inputs import IMAGE, VIDEO

from .options import ServeOptions
from .uploads import UploadError


def judge_upload(path: Path, options: ServeOptions) -> str:
    """``"image"`` or ``"video"`` for an acceptable upload; otherwise :class:`UploadError` says why."""
    if is_image_file(path):
        _check_image(path, options.max_pixels)
        return IMAGE
    _check_video(path, options)
    return VIDEO


def _check_image(path: Path, max_pixels: int) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
    except Image.DecompressionBombError:  # PIL refuses headers past twice its own limit at open
        raise UploadError(413, _too_many_pixels("image", max_pixels)) from None
    except Exception:  # the magic bytes said image; the decoder will name what is broken
        return
    if width * height > max_pixels:
        raise UploadError(413, _too_many_pixels(f"image of {width}x{height} pixels", max_pixels))


def _too_many_pixels(what: str, max_pixels: int) -> str:
    return (
        f"{what} exceeds the limit of {max_pixels} pixels (--max-pixels; possible decompression bomb); "
        "refused without decoding"
    )


def _check_video(path: Path, options: ServeOptions) -> None:
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        raise UploadError(415, "neither an image nor a video (content not recognised)") from None
    try:
        fmt = container.format.name
        # FFmpeg's still-image demuxers "open" many non-videos; what they open is not a video.
        if fmt == "image2" or fmt.endswith("_pipe"):
            raise UploadError(415, "neither an image nor a video (content not recognised)")
        if not container.streams.video:
            raise UploadError(422, "no video stream in the file (an audio file or an empty container?)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if width * height > options.max_video_pixels:
            raise UploadError(
                413,
                f"video frames of {width}x{height} pixels exceed the limit of {options.max_video_pixels} "
                "pixels (--max-video-pixels)",
            )
        seconds = _duration(container, stream)
        if seconds is not None and seconds > options.max_video_seconds:
            raise UploadError(
                413,
                f"video of {seconds:.1f} s is longer than the limit of {options.max_video_seconds:g} s "
                "(--max-video-seconds)",
            )
        frames, _ = stream_frame_count(container, stream, options.max_video_frames)
        if frames > options.max_video_frames:
            raise UploadError(
                413,
                f"video of more than {options.max_video_frames} frames exceeds the limit "
                "(--max-video-frames)",
            )
        if frames == 0:
            raise UploadError(422, "video has no frames")
    finally:
        container.close()


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        import av

        return container.duration / av.time_base
    return None

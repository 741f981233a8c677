"""Video decoding with PyAV: frame counts and evenly spaced RGB frames.

Every failure (missing, empty, corrupt file, no video stream, no decodable frame) is a :class:`DataError`
naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from masm.errors import DataError

from .sampling import sample_indices

log = logging.getLogger(__name__)

# FFmpeg's error classes (PyAV's names) in words; PyAV's own text starts with FFmpeg's numeric error code
# ("[Errno 1094995529] Invalid data found ...", the code being AVERROR_INVALIDDATA), which says nothing.
_FFMPEG_ERRORS = {
    "InvalidDataError": "invalid or corrupt data: not a video FFmpeg can read",
    "EOFError": "the file ends before the video does (truncated?)",
    "DecoderNotFoundError": "no decoder for its video codec in this FFmpeg",
    "DemuxerNotFoundError": "its container format is not one FFmpeg knows",
    "PatchWelcomeError": "uses a feature FFmpeg does not implement",
    "BugError": "FFmpeg failed on it (an FFmpeg bug)",
    "UnknownError": "FFmpeg failed on it for an unknown reason",
}


def video_error_reason(err: BaseException) -> str:
    """What went wrong, in words, for an error PyAV raised: no FFmpeg error number and no path (callers
    name the file themselves)."""
    import av

    for name, words in _FFMPEG_ERRORS.items():
        if isinstance(err, getattr(av.error, name)):
            return words
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    if text.startswith("[Errno"):  # "[Errno N] message: 'path'" without strerror
        text = text.split("] ", 1)[-1]
    path = getattr(err, "filename", None)
    if path:
        text = text.replace(f": '{path}'", "").replace(f": {path}", "")
    return text[:1].lower() + text[1:]


def _open(path: Path):
    import av

    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot open video ({video_error_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    return container


def count_frames(path: str | Path) -> int:
    """Number of frames in the first video stream: from the header, else by counting packets (no decode)."""
    path = Path(path)
    container = _open(path)
    try:
        count, broken = stream_frame_count(container, container.streams.video[0])
        if broken is not None:
            log.warning("%s: stopped counting packets at %d (%s)", path, count, video_error_reason(broken))
        return count
    finally:
        container.close()


def stream_frame_count(container, stream, limit: int | None = None):
    """``(frames, error)`` of an open stream: the header's count if it has one, else its packets counted
    without decoding (stopping once past ``limit``); ``error`` is the FFmpeg error a broken stream ended
    with (the frames before it are what a decoder will see), else None."""
    import av

    if stream.frames and stream.frames > 0:
        return int(stream.frames), None
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if limit is not None and count > limit:
                    break
    except av.FFmpegError as err:
        return count, err
    return count, None


def read_frames(path: str | Path, num_frames: int, mode: str = "linspace") -> list[tuple[int, np.ndarray]]:
    """``num_frames`` frames of ``path`` as ``(frame_index, RGB uint8 (H, W, 3))`` pairs, in order.

    ``mode="linspace"`` spreads them evenly over the video, ``"first"`` takes the first ones;
    ``num_frames <= 0`` reads every frame. The video is decoded sequentially (exact, no seek drift).
    A video that breaks off early returns the frames decoded before the break, with a warning; one with no
    decodable frame is a :class:`DataError`.
    """
    import av

    path = Path(path)
    total = count_frames(path)
    if total == 0:
        raise DataError(f"{path}: video has no frames")
    wanted = set(sample_indices(total, num_frames, mode))
    last = max(wanted)
    out: list[tuple[int, np.ndarray]] = []
    container = _open(path)
    error = None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                out.append((index, frame.to_ndarray(format="rgb24")))
            if index >= last:
                break
    except (av.FFmpegError, ValueError) as err:
        error = err
    finally:
        container.close()
    reason = video_error_reason(error) if error is not None else None
    if not out:
        raise DataError(f"{path}: no decodable video frame" + (f" ({reason})" if reason else ""))
    if error is not None or len(out) < len(wanted):
        log.warning("%s: decoded %d of %d wanted frames (%s)", path, len(out), len(wanted), reason or "short")
    return out

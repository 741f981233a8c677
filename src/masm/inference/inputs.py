"""What ``masm detect`` was given, expanded into files to score.

Arguments are image or video files, folders (recursed) or ``-`` (one path per line on stdin). A file's kind
is judged by its content; a file whose content is not recognised keeps the kind its extension suggests, so
a corrupt ``.png`` or ``.mp4`` is reported as a broken image or video rather than silently ignored. Inside
folders, files that are neither recognised nor named like images or videos (READMEs, JSON indexes) are
skipped; given by name, they are reported. Missing paths and empty folders become inputs with an error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from masm.data.images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image_file, is_video_file

IMAGE = "image"
VIDEO = "video"


@dataclass
class Input:
    """One thing to score: ``kind`` is ``"image"``, ``"video"`` or ``None`` when ``error`` says why not."""

    path: str
    kind: str | None
    error: str | None = None


def expand_inputs(args: Iterable[str], stdin: TextIO | None = None) -> Iterator[Input]:
    """The inputs named by ``args`` in order; folders are walked in sorted order, ``-`` reads ``stdin``."""
    for arg in args:
        if arg == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.strip()
                if line:
                    yield from _expand_path(line)
        else:
            yield from _expand_path(arg)


def _expand_path(arg: str) -> Iterator[Input]:
    path = Path(arg)
    if path.is_dir():
        found = False
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            item = classify(file, in_folder=True)
            if item is not None:
                found = True
                yield item
        if not found:
            yield Input(arg, None, f"{arg}: folder holds no image or video file")
    elif path.is_file():
        yield classify(path, in_folder=False)
    elif path.exists():
        yield Input(arg, None, f"{arg}: not a regular file or folder")
    else:
        yield Input(arg, None, f"{arg}: no such file or folder")


def classify(path: Path, *, in_folder: bool) -> Input | None:
    """The :class:`Input` for an existing file; ``None`` for an unrelated file found inside a folder."""
    name = str(path)
    suffix = path.suffix.lower()
    # An image name goes before the video check: FFmpeg's image2 demuxer "opens" any file named .jpg.
    if is_image_file(path) or suffix in IMAGE_EXTENSIONS:
        return Input(name, IMAGE)  # for a broken one the image loader says what is wrong with it
    if is_video_file(path):
        return Input(name, VIDEO)
    if suffix in VIDEO_EXTENSIONS:
        return Input(name, VIDEO)  # likewise the video reader
    if in_folder:
        return None
    return Input(name, None, f"{name}: neither an image nor a video (content not recognised)")

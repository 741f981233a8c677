"""Folders of labelled images, as the AI-generated-image benchmarks ship them: what their readers share.

GenImage (:mod:`.genimage`), UniversalFakeDetect / CNNDetection and Chameleon (:mod:`.univfd`) all put the
images of one class of one generator in one folder. Every image is its own "video" (they are photos, not
frames) and carries its generator as ``family``, reals included, so reports can set each generator's reals
against its fakes. Images are recognised by extension, as the folder reader does; other files are skipped
and counted, and a file that cannot be decoded is counted when it is loaded, as for every reader.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from masm.errors import DataError

from .images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .index import FrameIndex, SkipLog, VideoEntry, build_index
from .labels import FAKE, REAL

#: How many entries an error message lists of a folder it did not expect.
_LISTED = 8


def subfolders(folder: Path) -> list[Path]:
    """The folders directly in ``folder``, sorted, hidden ones left out."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def listing(folder: Path) -> str:
    """What ``folder`` holds, for an error message: ``"a/, b/, notes.txt"`` (8 names at most) or "nothing"."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:_LISTED]]
    more = f", ... ({len(entries) - _LISTED} more)" if len(entries) > _LISTED else ""
    return ", ".join(names) + more if names else "nothing"


def count_stray_files(folder: Path, skips: SkipLog) -> None:
    """Files lying beside the layout's folders (READMEs, archives) are not images of any class: counted."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            skips.add("files outside the image folders", str(path))


def image_entries(class_dir: Path, label: int, generator: str, key: str, skips: SkipLog) -> list[VideoEntry]:
    """Every image under ``class_dir`` (any depth), one :class:`VideoEntry` each, keyed ``key/<its path>``."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = here / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                rel = path.relative_to(class_dir).as_posix()
                entries.append(VideoEntry(f"{key}/{rel}", label, generator, [str(path)]))
            elif suffix in VIDEO_EXTENSIONS:
                skips.add("video files (not images)", str(path))
            else:
                skips.add("non-image files", str(path))
    return entries


def images_index(
    root: Path, source: str, images: Iterable[VideoEntry], skips: SkipLog, expected: str
) -> FrameIndex:
    """The :class:`FrameIndex` of listed images; none at all is an error naming ``root`` and the layout.

    A generator with images of one class only is noted: its own AUC and AP are undefined.
    """
    images = list(images)
    if not images:
        found = ", ".join(f"{n} {r}" for r, n in sorted(skips.counts.items())) or "no files"
        raise DataError(f"{root}: no images found (expected {expected}; found {found})")
    classes: dict[str, set[int]] = defaultdict(set)
    for entry in images:
        classes[str(entry.family)].add(entry.label)
    one_class = [
        f"{generator} ({'reals' if labels == {REAL} else 'fakes'} only)"
        for generator, labels in sorted(classes.items())
        if labels != {REAL, FAKE}
    ]
    index = build_index(
        root.resolve().name,
        source,
        images,
        frames_per_video=1,
        parity=False,
        resolve=Path,  # listed by walking the folders: they exist
        skips=skips,
    )
    if one_class:
        index.notes.append("generators with one class only (AUC undefined): " + ", ".join(one_class))
    return index

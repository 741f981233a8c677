"""Plain folder datasets: ``ROOT/real/**`` and ``ROOT/fake/**`` images.

``fake/<family>/**`` names a forgery family. A folder that directly holds images is the frames of one
video (key: its path under ROOT); an image lying next to sub-folders is a video of its own. Anything else
at the top (no ``real``/``fake``, stray folders or files other than metadata such as ``.json`` / ``.md``) is
an error naming it; non-image files inside
are skipped and counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from masm.errors import DataError

from .images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .index import FrameIndex, SkipLog, VideoEntry, build_index
from .labels import FAKE, REAL

_METADATA = {".json", ".md", ".txt", ".yaml", ".yml"}
_KNOWN = ("real", "fake", "masks")


def read_folder(root: Path, *, frames_per_video: int, parity: bool = False, source: str = "") -> FrameIndex:
    """Read folder dataset ``root`` into a :class:`FrameIndex` (see module doc)."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    # Documentation and metadata beside the two class folders (README, masm synth's synth.json and its
    # masks/ of forgery regions) are fine.
    stray = [p.name for p in entries if p.name not in _KNOWN and p.suffix.lower() not in _METADATA]
    if stray or not any(p.is_dir() for p in entries):
        raise DataError(
            f"{root}: expected only 'real/' and 'fake/' folders (fake/<family>/ for families); "
            f"found {', '.join(p.name + ('/' if p.is_dir() else '') for p in entries) or 'nothing'}"
        )
    skips = SkipLog()
    videos: list[VideoEntry] = []
    for class_dir, label in ((root / "real", REAL), (root / "fake", FAKE)):
        if class_dir.is_dir():
            videos += _collect(root, class_dir, label, skips)
        elif class_dir.exists():
            raise DataError(f"{class_dir}: expected a folder")
    return build_index(
        root.resolve().name,
        source or f"folder:{root}",
        videos,
        frames_per_video=frames_per_video,
        parity=parity,
        resolve=lambda p: Path(p) if os.path.isfile(p) else None,
        skips=skips,
    )


def _collect(root: Path, class_dir: Path, label: int, skips: SkipLog) -> list[VideoEntry]:
    videos = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel = here.relative_to(class_dir).parts
        family = rel[0] if label == FAKE and rel else None
        images = []
        for name in sorted(f for f in filenames if not f.startswith(".")):
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(str(here / name))
            elif suffix in VIDEO_EXTENSIONS:
                skips.add("video files (run `masm preprocess` to extract faces)", str(here / name))
            else:
                skips.add("non-image files", str(here / name))
        if not images:
            continue
        key_dir = here.relative_to(root).as_posix()
        if dirnames or here == class_dir or (label == FAKE and len(rel) == 1):
            # images beside sub-folders, or directly in real/, fake/, fake/<family>/: one video each
            videos += [
                VideoEntry(f"{root.name}/{key_dir}/{Path(p).name}", label, family, [p]) for p in images
            ]
        else:
            videos.append(VideoEntry(f"{root.name}/{key_dir}", label, family, images))
    return videos

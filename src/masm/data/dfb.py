"""DeepfakeBench dataset indexes (JSON), read as protocol.md describes.

``{dataset: {label: {split: {[c23|c40|raw:] {video: {"label", "frames", "masks"}}}}}}``: the compression
level is only present for the FaceForensics++ family, DFD and FaceShifter; an index without split level
(``{label: {video: ...}}``) is read as one split. Video keys are ``dataset/label/video`` so two forgery
methods that share a video name stay apart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from masm.errors import DataError

from .index import FrameIndex, SkipLog, VideoEntry, build_index
from .labels import FAKE, resolve_label

SPLITS = ("train", "val", "test")
COMPRESSIONS = ("c23", "c40", "raw")
_DRIVE = re.compile(r"^[A-Za-z]:/")


class FramePathResolver:
    """Find frame files listed as relative, absolute or Windows-style paths.

    Order: an existing absolute path; ``root/path`` for each root; else the shortest suffix of the path that
    exists under a root (so ``D:\\\\data\\\\FaceForensics++\\\\...`` or ``/old/machine/rgb/FaceForensics++/...``
    is found under ``data_root``). A prefix that worked once is reused for the other paths.
    """

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self._rules: list[tuple[tuple[str, ...], Path]] = []

    def __call__(self, raw: str) -> Path | None:
        text = raw.replace("\\", "/")
        if text.startswith("/") and os.path.isfile(text):
            return Path(text)
        is_absolute = text.startswith("/") or bool(_DRIVE.match(text))
        text = _DRIVE.sub("", text).lstrip("/")
        if not is_absolute:
            for root in self.roots:
                candidate = root / text
                if candidate.is_file():
                    return candidate
        parts = tuple(p for p in text.split("/") if p not in ("", "."))
        for prefix, root in self._rules:
            if parts[: len(prefix)] == prefix:
                candidate = root.joinpath(*parts[len(prefix) :])
                if candidate.is_file():
                    return candidate
        for k in range(1, len(parts)):
            for root in self.roots:
                candidate = root.joinpath(*parts[k:])
                if candidate.is_file():
                    self._rules.append((parts[:k], root))
                    return candidate
        return None


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: DeepfakeBench index not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a valid JSON file ({err})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected {{dataset: {{label: {{split: ...}}}}}} at the top level")
    return data


def read_dfb(
    path: Path,
    *,
    split: str = "test",
    compression: str = "c23",
    data_root: Path | None,
    label_dict: Mapping[str, int],
    frames_per_video: int,
    parity: bool = False,
    source: str = "",
) -> FrameIndex:
    """Read the ``split`` of DeepfakeBench index ``path`` into a :class:`FrameIndex` (see module doc)."""
    if split not in SPLITS:
        raise DataError(f"{path}: unknown split {split!r} (known: {', '.join(SPLITS)})")
    if compression not in COMPRESSIONS:
        raise DataError(f"{path}: unknown compression {compression!r} (known: {', '.join(COMPRESSIONS)})")
    data = load_json(path)
    skips = SkipLog()
    videos = list(_iter_videos(data, path, split, compression, label_dict, skips))
    roots = [data_root] if data_root else []
    roots.append(path.resolve().parent)
    name = "+".join(data)
    return build_index(
        name,
        source or f"dfb:{path}@{split}",
        videos,
        frames_per_video=frames_per_video,
        parity=parity,
        resolve=FramePathResolver(roots),
        skips=skips,
    )


def _iter_videos(
    data: dict, path: Path, split: str, compression: str, label_dict: Mapping[str, int], skips: SkipLog
) -> Iterator[VideoEntry]:
    splits_seen: set[str] = set()
    found_split = False
    for dataset, labels in data.items():
        for label_name, node in labels.items():
            where = f"{path} [{dataset}/{label_name}]"
            if not isinstance(node, dict):
                raise DataError(f"{where}: expected a mapping of splits or videos")
            if node and set(node) <= set(SPLITS):
                splits_seen |= set(node)
                if split not in node:
                    continue
                node = node[split]
                where = f"{path} [{dataset}/{label_name}/{split}]"
            found_split = True
            if isinstance(node, dict) and node and set(node) <= set(COMPRESSIONS):
                if compression not in node:
                    skips.add(f"labels without compression {compression}", f"{dataset}/{label_name}")
                    continue
                node = node[compression]
            if not isinstance(node, dict):
                raise DataError(f"{where}: expected a mapping of videos")
            for video_name, info in node.items():
                yield _video_entry(dataset, label_name, video_name, info, path, where, label_dict)
    if not found_split:
        raise DataError(
            f"{path}: no label has split {split!r} (splits present: {', '.join(sorted(splits_seen))})"
        )


def _video_entry(dataset, label_name, video_name, info, path, where, label_dict) -> VideoEntry:
    if isinstance(info, list):
        frames, name = info, label_name
        family = None
    elif isinstance(info, dict) and "frames" in info:
        frames, name = info["frames"], info.get("label", label_name)
        family = info.get("family")
    else:
        raise DataError(f"{where}/{video_name}: expected a video entry with a 'frames' list")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise DataError(f"{where}/{video_name}: 'frames' must be a list of paths")
    label = resolve_label(name, label_dict, str(path))
    if family is None and label == FAKE and name != "fake":
        family = name
    return VideoEntry(f"{dataset}/{label_name}/{video_name}", label, family, frames)

"""One data spec string for every dataset: ``dfb:PATH.json[@split]``, ``folder:DIR`` or ``frames:PATH.jsonl``.

:func:`open_dataset` reads a spec into a :class:`FrameIndex`: the frames to use (already sampled per video),
their labels, video keys and forgery families, plus an account of what was loaded and what was skipped
and why. Train configs, ``masm eval`` and the benchmarks all go through it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from masm.errors import DataError

from .labels import FAKE, REAL, build_label_dict
from .sampling import balance_indices, sample_evenly

LABEL_NAMES = {REAL: "real", FAKE: "fake"}


@dataclass(frozen=True)
class FrameRecord:
    """One frame to load: image ``path``, ``label`` 0 real / 1 fake, ``video`` key, forgery ``family``."""

    path: str
    label: int
    video: str
    family: str | None = None


@dataclass
class VideoEntry:
    """A video as a reader lists it, before frame sampling and path checks."""

    key: str
    label: int
    family: str | None
    frames: list[str]


class SkipLog:
    """What a reader left out and why: per reason a count and the first example."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] += count
        self.examples.setdefault(reason, example)

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {r: {"count": n, "example": self.examples[r]} for r, n in sorted(self.counts.items())}


@dataclass
class FrameIndex:
    """The frames of one dataset, with what was loaded and skipped.

    ``name`` is the dataset's name (a DeepfakeBench index's dataset key, a folder's name), ``records`` the
    frames to use in order, ``source`` the spec it came from.
    """

    name: str
    records: list[FrameRecord]
    source: str = ""
    skipped: dict[str, dict[str, object]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Videos and frames per label and per family, skipped items with reasons, notes (e.g. balancing)."""
        videos: dict[str, set[str]] = defaultdict(set)
        frames: Counter[str] = Counter()
        fam_videos: dict[str, set[str]] = defaultdict(set)
        fam_frames: Counter[str] = Counter()
        for r in self.records:
            name = LABEL_NAMES[r.label]
            videos[name].add(r.video)
            frames[name] += 1
            if r.family is not None:
                fam_videos[r.family].add(r.video)
                fam_frames[r.family] += 1
        return {
            "name": self.name,
            "source": self.source,
            "videos": {n: len(videos[n]) for n in ("real", "fake")},
            "frames": {n: frames[n] for n in ("real", "fake")},
            "families": {
                f: {"videos": len(fam_videos[f]), "frames": fam_frames[f]} for f in sorted(fam_frames)
            },
            "skipped": self.skipped,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """One human-readable line: what was loaded, per family, and what was skipped.

        Counts are videos and frames; an index of single images (each frame its own video) counts frames
        only, and its families in frames, since it has no videos to speak of.
        """
        s = self.summary()
        if s["videos"] == s["frames"]:  # every "video" is one frame: images, not videos
            text = f"{self.name}: real {s['frames']['real']} frames, fake {s['frames']['fake']} frames"
            unit = "frames"
        else:
            text = (
                f"{self.name}: real {s['videos']['real']} videos / {s['frames']['real']} frames, "
                f"fake {s['videos']['fake']} videos / {s['frames']['fake']} frames"
            )
            unit = "videos"
        if s["families"]:
            text += " (" + ", ".join(f"{f} {v[unit]}" for f, v in s["families"].items()) + ")"
        if self.skipped:
            parts = [f"{v['count']} {reason} (e.g. {v['example']})" for reason, v in self.skipped.items()]
            text += "; skipped: " + "; ".join(parts)
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


def build_index(
    name: str,
    source: str,
    videos: Iterable[VideoEntry],
    *,
    frames_per_video: int,
    parity: bool,
    resolve: Callable[[str], Path | None],
    skips: SkipLog,
) -> FrameIndex:
    """Sample frames per video, check they exist (missing ones are counted, never replaced)."""
    mode = "first" if parity else "linspace"
    records: list[FrameRecord] = []
    for video in videos:
        if not video.frames:
            skips.add("videos without frames", video.key)
            continue
        kept = 0
        for raw in sample_evenly(video.frames, frames_per_video, mode):
            path = resolve(raw)
            if path is None:
                skips.add("missing frame files", raw)
                continue
            key = _parity_key(raw) if parity else video.key
            records.append(FrameRecord(str(path), video.label, key, video.family))
            kept += 1
        if kept == 0:
            skips.add("videos with all sampled frames missing", video.key)
    return FrameIndex(name=name, records=records, source=source, skipped=skips.as_dict())


def _parity_key(raw: str) -> str:
    """DeepfakeBench's video key: the frame's parent folder name (merges same-named videos of two methods)."""
    parts = raw.replace("\\", "/").rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 else parts[-1]


def balance(index: FrameIndex, seed: int) -> FrameIndex:
    """Resample the real frames to as many as the fake ones (see :func:`sampling.balance_indices`)."""
    labels = [r.label for r in index.records]
    order = balance_indices(labels, seed)
    before = Counter(labels)
    index.records = [index.records[i] for i in order]
    after = Counter(r.label for r in index.records)
    if before != after:
        index.notes.append(f"balanced: real frames resampled {before[REAL]} -> {after[REAL]} (seed {seed})")
    return index


def open_dataset(
    spec: str,
    *,
    data_root: str | Path | None = None,
    frames_per_video: int = 32,
    compression: str = "c23",
    label_dict: Mapping[str, int] | None = None,
    balance: bool = False,
    parity: bool = False,
    seed: int = 0,
    split: str | None = None,
) -> FrameIndex:
    """Read a data spec into a :class:`FrameIndex`.

    - ``dfb:PATH.json[@split]``: a DeepfakeBench index; ``split`` (argument or ``@split``, default ``test``),
      ``compression`` (``c23``/``c40``/``raw``, for indexes that nest it), frame paths resolved against
      ``data_root`` (default: the JSON's folder), ``label_dict`` extending the standard label names.
    - ``folder:DIR``: ``DIR/real/**`` and ``DIR/fake/**`` images (``fake/<family>/**`` names a family).
    - ``frames:PATH.jsonl``: one :class:`FrameRecord` per line (``path``, ``label``, ``video``, ``family``),
      taken as is (no frame sampling): what a run trained on in-memory data saves, so it can be rerun.

    ``frames_per_video`` frames are taken evenly over each video (``<= 0``: all); ``balance`` resamples
    the real frames to as many as the fake ones (seeded by ``seed``); ``parity`` reproduces DeepfakeBench
    (first N frames, parent-folder video keys) for comparison with published tables.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DataError(f"data spec {spec!r}: expected 'dfb:PATH.json[@split]' or 'folder:DIR'")
    labels = build_label_dict(label_dict)
    if kind == "dfb":
        from .dfb import read_dfb

        path, at, spec_split = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if at and split and spec_split != split:
            raise DataError(f"data spec {spec!r}: split @{spec_split} conflicts with split={split!r}")
        index = read_dfb(
            Path(path),
            split=(spec_split if at else split) or "test",
            compression=compression,
            data_root=Path(data_root) if data_root else None,
            label_dict=labels,
            frames_per_video=frames_per_video,
            parity=parity,
            source=spec,
        )
    elif kind == "folder":
        from .folder import read_folder

        index = read_folder(Path(rest), frames_per_video=frames_per_video, parity=parity, source=spec)
    elif kind == "frames":
        index = read_frame_list(Path(rest), source=spec)
    else:
        raise DataError(f"data spec {spec!r}: unknown kind {kind!r} (known: dfb, folder, frames)")
    if not index.records:
        raise DataError(f"data spec {spec!r}: no frames loaded. {index.describe()}")
    return _balance(index, seed) if balance else index


_balance = balance


def read_frame_list(path: Path, *, source: str = "") -> FrameIndex:
    """A ``frames:`` spec: one JSON :class:`FrameRecord` per line, taken as is."""
    if not path.is_file():
        raise DataError(f"frame list not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            records.append(
                FrameRecord(str(item["path"]), int(item["label"]), str(item["video"]), item.get("family"))
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{number}: not a frame record ({type(err).__name__}: {err})") from None
    return FrameIndex(name=path.stem, records=records, source=source or f"frames:{path}")

"""The frame index every dataset reader produces: frames with labels, video keys and families.

:class:`FrameIndex` holds the frames to use and an account of what was loaded and skipped; readers list
:class:`VideoEntry` items, note what they leave out in a :class:`SkipLog`, and :func:`build_index` samples
frames per video and checks they exist. The readers (:mod:`masm.data.dfb`, :mod:`masm.data.folder`) and
the spec dispatch above them (:mod:`masm.data.spec`) share these; this module imports neither.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .labels import FAKE, REAL
from .sampling import sample_evenly

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

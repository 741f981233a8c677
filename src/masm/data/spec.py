"""One data spec string for every dataset: ``dfb:PATH.json[@split]``, ``folder:DIR``, ``frames:PATH.jsonl``,
or an AI-generated-image benchmark as distributed: ``genimage:ROOT[@split]``, ``univfd:ROOT``,
``chameleon:ROOT``.

:func:`open_dataset` reads a spec into a :class:`FrameIndex`: the frames to use (already sampled per video),
their labels, video keys and forgery families, plus an account of what was loaded and what was skipped
and why. Train configs, ``masm eval`` and the benchmarks all go through it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from masm.errors import DataError

from .index import FrameIndex, FrameRecord
from .labels import REAL, build_label_dict
from .sampling import balance_indices

#: The kinds of data spec (``KIND:PATH``) :func:`open_dataset` reads.
KINDS = ("dfb", "folder", "frames", "genimage", "univfd", "chameleon")


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
    - ``genimage:ROOT[@split]`` (``train``/``val``, default ``val``), ``univfd:ROOT``, ``chameleon:ROOT``: the
      AI-generated-image benchmarks' folders as they unpack (:mod:`.genimage`, :mod:`.univfd`); every
      image is its own video, and reals and fakes carry their generator as ``family``.

    ``frames_per_video`` frames are taken evenly over each video (``<= 0``: all); ``balance`` resamples
    the real frames to as many as the fake ones (seeded by ``seed``); ``parity`` reproduces DeepfakeBench
    (first N frames, parent-folder video keys) for comparison with published tables.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DataError(f"data spec {spec!r}: expected KIND:PATH, KIND one of {', '.join(KINDS)}")
    labels = build_label_dict(label_dict)
    # Each reader is imported only when its kind is asked for: the folder reader pulls in PIL.
    if kind == "dfb":
        from .dfb import read_dfb

        path, spec_split = _path_and_split(spec, rest, split)
        index = read_dfb(
            Path(path),
            split=spec_split or "test",
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
    elif kind == "genimage":
        from .genimage import read_genimage

        path, spec_split = _path_and_split(spec, rest, split)
        index = read_genimage(Path(path), split=spec_split or "val", source=spec)
    elif kind == "univfd":
        from .univfd import read_univfd

        index = read_univfd(Path(rest), source=spec)
    elif kind == "chameleon":
        from .univfd import read_chameleon

        index = read_chameleon(Path(rest), source=spec)
    else:
        raise DataError(f"data spec {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if not index.records:
        raise DataError(f"data spec {spec!r}: no frames loaded. {index.describe()}")
    return _balance(index, seed) if balance else index


_balance = balance


def _path_and_split(spec: str, rest: str, split: str | None) -> tuple[str, str | None]:
    """``PATH[@split]`` -> ``(PATH, split)``: the spec's ``@split``, else the ``split`` argument."""
    path, at, spec_split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at and split and spec_split != split:
        raise DataError(f"data spec {spec!r}: split @{spec_split} conflicts with split={split!r}")
    return path, spec_split if at else split


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

"""Videos and photos -> aligned face crops in DeepfakeBench's layout (``masm preprocess``).

For every video: ``frames`` evenly spaced frames (PyAV), the largest face of each
(:class:`masm.data.faces.FaceAligner`), an aligned crop written as ``OUT/frames/<video>/<idx>.png``
(``idx`` = frame index in the video); a still image is a video of one frame. The index
``OUT/<name>.json`` follows the DeepfakeBench schema (readable as ``dfb:OUT/<name>.json``) and records,
beside ``frames``, the frames without a face (``no_face``) and unreadable sources (``error``); a video
with no face at all stays in the index with an empty ``frames`` list, so readers report it.
``OUT/<name>.summary.json`` counts everything.

Resumable: each finished video leaves ``frames/<video>/.done.json`` (with the settings it was made with);
a rerun with the same settings reuses it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from masm.errors import DataError, MasmError

from .images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image_file, is_video_file, load_rgb
from .labels import STANDARD_LABELS
from .video import read_frames

log = logging.getLogger(__name__)
MARKER = ".done.json"


@dataclass(frozen=True)
class Settings:
    """What a crop depends on; a done marker made with other settings is redone."""

    frames: int = 32
    size: int = 256
    scale: float = 1.3
    detect_width: int = 640


@dataclass(frozen=True)
class Job:
    """One source to process: ``video`` name (also its frame folder), file, label name, kind."""

    video: str
    path: str
    label: str
    family: str | None
    kind: str  # "video" | "image"


def _classify(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if is_image_file(path):
        return "image"
    if is_video_file(path):
        return "video"
    return None


def _walk(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def discover(src: Path, label: str | None) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for ``src`` and skipped files ``(path, reason)``.

    ``src``: a video or image file, a folder of them (``label`` required), or a source tree with ``real/``
    and ``fake/`` (``fake/<family>/...``) sub-folders (labels ``real`` / ``fake``; ``label`` not allowed).
    """
    if not src.exists():
        raise MasmError(f"{src}: source not found")
    tree = src.is_dir() and ((src / "real").is_dir() or (src / "fake").is_dir())
    if tree and label:
        raise MasmError(f"{src}: has real/ and fake/ sub-folders, which set the labels; drop --label")
    if not tree:
        if not label:
            raise MasmError(
                f"{src}: give --label (e.g. real, fake, FF-DF) or use a folder with real/ and fake/"
            )
        if label not in STANDARD_LABELS:
            raise MasmError(f"--label {label!r} is not a known label name (e.g. real, fake, FF-real, FF-DF)")
    if src.is_file():
        kind = _classify(src)
        if kind is None:
            raise MasmError(f"{src}: neither an image nor a video")
        return [Job(src.stem, str(src), label, None, kind)], []
    groups = []
    if tree:
        for name in sorted(p.name for p in src.iterdir() if not p.name.startswith(".")):
            if name not in ("real", "fake"):
                raise MasmError(f"{src}: unexpected entry {name!r} beside real/ and fake/")
            groups.append((src / name, name))
    else:
        groups.append((src, label))
    jobs, skipped = [], []
    for folder, label_name in groups:
        for path in _walk(folder):
            kind = _classify(path)
            if kind is None:
                skipped.append((str(path), "neither an image nor a video"))
                continue
            rel = path.relative_to(folder).with_suffix("").as_posix()
            family = rel.split("/")[0] if tree and label_name == "fake" and "/" in rel else None
            video = f"{label_name}/{rel}" if tree else rel
            jobs.append(Job(video, str(path), label_name, family, kind))
    names = Counter(j.video for j in jobs)
    if dupes := [n for n, c in names.items() if c > 1]:
        raise MasmError(
            f"{src}: several files would share the video name {dupes[0]!r} (same name, other extension)"
        )
    return jobs, skipped


_ALIGNER = None


def _aligner(settings: Settings):
    global _ALIGNER
    from .faces import FaceAligner

    if _ALIGNER is None or (_ALIGNER.crop_size, _ALIGNER.scale, _ALIGNER.detect_width) != (
        settings.size,
        settings.scale,
        settings.detect_width,
    ):
        _ALIGNER = FaceAligner(settings.size, settings.scale, settings.detect_width)
    return _ALIGNER


def process_job(job: Job, out: Path, settings: Settings) -> dict:
    """Crop the faces of one source; returns its result record (also saved as its done marker)."""
    from PIL import Image

    video_dir = out / "frames" / job.video
    marker = video_dir / MARKER
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
            if saved.get("settings") == asdict(settings) and saved.get("source") == job.path:
                return {**saved["result"], "resumed": True}
        except (OSError, ValueError, KeyError):
            pass  # unreadable marker: redo the video
    result = {**asdict(job), "frames": [], "no_face": [], "error": None, "resumed": False}
    try:
        if job.kind == "video":
            frames = read_frames(job.path, settings.frames)
        else:
            frames = [(0, load_rgb(job.path))]
    except DataError as err:
        result["error"] = str(err)
        return result
    aligner = _aligner(settings)
    video_dir.mkdir(parents=True, exist_ok=True)
    for index, rgb in frames:
        faces = aligner.detect(rgb)
        if not faces:
            result["no_face"].append(index)
            continue
        crop = aligner.align(rgb, faces[0])
        name = f"{index:03d}.png"
        Image.fromarray(crop).save(video_dir / name)
        result["frames"].append(f"frames/{job.video}/{name}")
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": asdict(settings), "source": job.path, "result": result}))
    os.replace(tmp, marker)
    return result


def _process_star(args):
    return process_job(*args)


def run_preprocess(
    src: str | Path,
    out: str | Path,
    name: str,
    *,
    label: str | None = None,
    settings: Settings = Settings(),
    workers: int = 1,
    split: str = "test",
    progress: bool = True,
) -> dict:
    """Preprocess ``src`` into ``out`` (see module doc); returns the summary (also saved as JSON)."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if not name or "/" in name or "\\" in name:
        raise MasmError(f"--name {name!r}: give a plain dataset name")
    jobs, skipped = discover(src, label)
    if not jobs:
        raise MasmError(f"{src}: no images or videos found")
    out.mkdir(parents=True, exist_ok=True)
    _aligner(settings)  # load the models (and fail early) before forking workers
    tasks = [(job, out, settings) for job in jobs]
    results: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"preprocess {name}", unit="video", disable=not progress)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap_unordered(_process_star, tasks):
                results.append(result)
                bar.update()
    else:
        for task in tasks:
            results.append(_process_star(task))
            bar.update()
    bar.close()
    results.sort(key=lambda r: (r["label"], r["video"]))
    index: dict = {name: {}}
    for r in results:
        entry = {"label": r["label"], "frames": r["frames"], "masks": [], "no_face": r["no_face"]}
        if r["family"]:
            entry["family"] = r["family"]
        if r["error"]:
            entry["error"] = r["error"]
        index[name].setdefault(r["label"], {}).setdefault(split, {})[r["video"]] = entry
    (out / f"{name}.json").write_text(json.dumps(index, indent=1))
    summary = summarize(results, skipped)
    summary.update(name=name, source=str(src), index=str(out / f"{name}.json"), settings=asdict(settings))
    (out / f"{name}.summary.json").write_text(json.dumps({**summary, "videos_detail": results}, indent=1))
    return summary


def summarize(results: list[dict], skipped: list[tuple[str, str]]) -> dict:
    """Counts of videos (with faces, partly without, without any face, unreadable), frames, skipped files."""
    no_face_videos = [r["path"] for r in results if not r["error"] and not r["frames"]]
    errors = [(r["path"], r["error"]) for r in results if r["error"]]
    return {
        "videos": len(results),
        "videos_with_faces": sum(1 for r in results if r["frames"]),
        "videos_partly_without_face": sum(1 for r in results if r["frames"] and r["no_face"]),
        "videos_without_face": len(no_face_videos),
        "videos_unreadable": len(errors),
        "videos_resumed": sum(1 for r in results if r.get("resumed")),
        "frames_written": sum(len(r["frames"]) for r in results),
        "frames_without_face": sum(len(r["no_face"]) for r in results),
        "files_skipped": len(skipped),
        "no_face_examples": no_face_videos[:5],
        "unreadable_examples": errors[:5],
        "skipped_examples": skipped[:5],
    }


def format_summary(summary: dict) -> str:
    """Human-readable report of :func:`run_preprocess`'s summary."""
    lines = [
        f"{summary['name']}: {summary['videos']} sources, {summary['videos_with_faces']} with faces "
        f"({summary['videos_partly_without_face']} partly without), {summary['videos_without_face']} without "
        f"any face, {summary['videos_unreadable']} unreadable, {summary['videos_resumed']} resumed; "
        f"{summary['frames_written']} face crops written, {summary['frames_without_face']} frames without a "
        f"face; {summary['files_skipped']} other files skipped",
    ]
    lines += [f"  no face found in: {p}" for p in summary["no_face_examples"]]
    lines += [f"  unreadable: {err}" for _, err in summary["unreadable_examples"]]
    lines += [f"  skipped {p}: {why}" for p, why in summary["skipped_examples"]]
    lines.append(f"  index: {summary['index']} (read it as dfb:{summary['index']})")
    return "\n".join(lines)

"""The files ``masm detect --explain DIR`` writes for one input, and the result keys that name them.

* an image: ``DIR/NNNNN-NAME.png``, the image with its map (several faces: the largest map value of
  any face at each pixel), key ``explanation``;
* a video: ``DIR/NNNNN-NAME/frame-FFFFFF.png`` per scored frame (key ``frame_explanations``, in frame
  order) and one contact sheet ``DIR/NNNNN-NAME-sheet.png`` (key ``explanation``): the highest-scoring
  frames with their maps and the per-frame score over time.

``NNNNN`` is the input's position in the run and ``NAME`` its file name without the extension, so inputs
of the same name (in different folders, or photo.jpg and photo.png) do not overwrite each other.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .geometry import to_frame
from .render import save_overlay, video_sheet


def file_stem(number: int, path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "input"
    return f"{number:05d}-{name}"


def frame_map(job, slot: int) -> np.ndarray:
    """The map of frame slot ``slot`` in frame pixels: each of its crops' maps pulled back, their maximum."""
    rgb = job.frames[slot]
    maps = [
        to_frame(job.maps[i], job.matrices[i], rgb.shape[:2])
        for i, crop_slot in enumerate(job.crop_frames)
        if crop_slot == slot
    ]
    return np.maximum.reduce(maps)


def write_explanations(out_dir: str | Path, job, frame_scores: list[float]) -> dict:
    """Write the overlays (and a video's contact sheet) of a scored job; the keys to add to its result."""
    out_dir = Path(out_dir)
    result = job.result
    stem = file_stem(job.number, result["input"])
    if result["kind"] == "image":
        path = save_overlay(out_dir / f"{stem}.png", job.frames[0], frame_map(job, 0))
        return {"explanation": str(path)}
    maps = [frame_map(job, slot) for slot in range(len(job.frame_ids))]
    paths = [
        str(save_overlay(out_dir / stem / f"frame-{frame:06d}.png", rgb, map_))
        for frame, rgb, map_ in zip(job.frame_ids, job.frames, maps)
    ]
    sheet = video_sheet(
        out_dir / f"{stem}-sheet.png",
        job.frames,
        maps,
        job.frame_ids,
        frame_scores,
        title=f"{Path(result['input']).name}: P(fake) {result['score']:.3f} (mean over {len(maps)} frames)",
    )
    return {"explanation": str(sheet), "frame_explanations": paths}

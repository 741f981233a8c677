"""Fixtures and builders for the data tests (import from test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def astronaut_frames(n: int = 6, size: int = 256, step: int = 3) -> list[np.ndarray]:
    """``n`` frames of scikit-image's astronaut (a real face), a ``size`` crop moved ``step`` px per frame."""
    import skimage.data

    img = skimage.data.astronaut()  # 512x512, face around x 175..265, y 76..166
    frames = []
    for i in range(n):
        x0, y0 = 90 + i * step, 10 + i * step // 2
        frames.append(np.ascontiguousarray(img[y0 : y0 + size, x0 : x0 + size]))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, crf: int = 18) -> Path:
    """Encode RGB frames with PyAV libx264 (yuv420p) into ``path``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_png(path: Path, value: int = 128, size: int = 16) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def make_dfb_fixture(root: Path, frames_per_video: int = 8) -> dict:
    """A small FaceForensics++ index with every path style and nesting form.

    FF-real (c23 and c40, relative paths), FF-DF (c23, absolute paths) and FF-F2F (c23, Windows paths)
    share the video ``000_003``; FF-real also has ``001`` in the train split. Returns paths and counts.
    """
    data_root = root / "rgb"
    ff = "FaceForensics++"

    def frames(sub: str, video: str) -> list[str]:
        rels = []
        for i in range(frames_per_video):
            rel = f"{ff}/{sub}/frames/{video}/{i:03d}.png"
            write_png(data_root / rel, value=i * 10)
            rels.append(rel)
        return rels

    real = frames("original_sequences/youtube/c23", "000_003")
    real40 = frames("original_sequences/youtube/c40", "000_003")
    df = [str(data_root / p) for p in frames("manipulated_sequences/Deepfakes/c23", "000_003")]
    f2f = [
        "D:\\data\\rgb\\" + p.replace("/", "\\")
        for p in frames("manipulated_sequences/Face2Face/c23", "000_003")
    ]
    train_real = frames("original_sequences/youtube/c23", "001")

    def entry(label, paths):
        return {"label": label, "frames": paths, "masks": []}

    index = {
        ff: {
            "FF-real": {
                "train": {"c23": {"001": entry("FF-real", train_real)}},
                "test": {
                    "c23": {"000_003": entry("FF-real", real)},
                    "c40": {"000_003": entry("FF-real", real40)},
                },
            },
            "FF-DF": {"test": {"c23": {"000_003": entry("FF-DF", df)}}},
            "FF-F2F": {"test": {"c23": {"000_003": entry("FF-F2F", f2f)}}},
        }
    }
    json_dir = root / "json"
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / "FaceForensics++.json"
    path.write_text(json.dumps(index))
    return {"json": path, "data_root": data_root, "index": index}

"""The frames ``masm bench data`` feeds the training loader: its own generated data set, or ``--data``'s.

The generated one (:func:`make_dataset`) is a DeepfakeBench index of aligned face crops of scikit-image's
astronaut photo, half of them forged with the ``blend`` family; :func:`open_records` reads either it or a
user's data as training reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

FRAMES_PER_VIDEO = 8


def make_dataset(root: Path, num_real: int, num_fake: int, size: int, seed: int = 0) -> Path:
    """A DeepfakeBench index ``root/BenchFaces.json`` (train split) of ``size`` px PNG face crops.

    Real crops: the astronaut's face aligned as ``masm preprocess`` aligns it (ArcFace template, margin
    1.3), each frame with a small random similarity jitter; fakes: such crops forged by the ``blend``
    family in a random soft region. ``FRAMES_PER_VIDEO`` frames per video, paths relative to ``root``.
    """
    import cv2
    import numpy as np
    import skimage.data
    from PIL import Image

    from masm.data import synth
    from masm.data.faces import FaceAligner
    from masm.errors import MasmError

    photo = skimage.data.astronaut()
    aligner = FaceAligner(size, 1.3, detect_width=0)
    faces = aligner.detect(photo)
    if not faces:
        raise MasmError("bench data: dlib found no face in the astronaut photo")
    base = np.vstack([aligner.transform_for(faces[0]), [0.0, 0.0, 1.0]])
    dataset = "BenchFaces"
    index: dict = {"real": {"train": {}}, "fake": {"train": {}}}
    for label, count in (("real", num_real), ("fake", num_fake)):
        for i in range(count):
            rng = synth.sample_rng(seed, 0 if label == "real" else 1, i)
            angle, scale = rng.uniform(-4, 4), rng.uniform(0.96, 1.04)
            jitter = np.vstack([cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale), [0, 0, 1]])
            jitter[:2, 2] += rng.uniform(-0.03, 0.03, size=2) * size
            crop = cv2.warpAffine(
                photo,
                (jitter @ base)[:2],
                (size, size),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )
            if label == "fake":
                image = synth.forge(
                    crop.astype(np.float32) / 255, "blend", synth.random_region(rng, size), rng, ()
                )
                crop = synth.to_uint8(image)
            video = f"{i // FRAMES_PER_VIDEO:03d}"
            rel = f"{dataset}/{label}/frames/{video}/{i % FRAMES_PER_VIDEO:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(root / rel)
            entry = index[label]["train"].setdefault(video, {"label": label, "frames": [], "masks": []})
            entry["frames"].append(rel)
    path = root / f"{dataset}.json"
    path.write_text(json.dumps({dataset: index}))
    return path


def open_records(data: str, data_root: str | None):
    """The training records of ``--data`` and its spec; a missing path or no frames is a :class:`MasmError`.

    A path is a DeepfakeBench index (its train split unless ``PATH.json@split``) or a folder dataset; a
    spec (``dfb:``, ``folder:``, ``frames:``) is read as training reads it (``dfb:`` without a split: train).
    """
    from masm.data.dfb import SPLITS
    from masm.data.spec import open_dataset
    from masm.errors import MasmError

    kind = data.partition(":")[0]
    if kind in ("dfb", "folder", "frames"):
        spec = data + "@train" if kind == "dfb" and "@" not in data[4:] else data
    else:
        base, at, split = data.rpartition("@")
        text, suffix = (base, f"@{split}") if at and split in SPLITS else (data, "@train")
        path = Path(text)
        if not path.exists():
            raise MasmError(f"{path}: not found (--data takes a DeepfakeBench JSON index or a data spec)")
        spec = f"folder:{text}" if path.is_dir() else f"dfb:{text}{suffix}"
    index = open_dataset(spec, data_root=data_root, frames_per_video=FRAMES_PER_VIDEO)
    return index.records, spec

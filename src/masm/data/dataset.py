"""A torch Dataset over :class:`masm.data.index.FrameRecord` lists that never hides a failed frame.

A frame that cannot be loaded is returned as a sample carrying its error (``pixel_values`` ``None``),
not replaced by another sample; :func:`collate_frames` moves such samples into ``batch["failed"]`` so
the caller can count and report them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from masm.errors import DataError

from .images import load_rgb
from .index import FrameRecord
from .transforms import FrameTransform


class FrameDataset(Dataset):
    """Samples ``{"pixel_values", "label", "index", "path", "error"}`` for ``records`` under ``transform``.

    ``transform`` maps an RGB uint8 array to a tensor; a :class:`FrameTransform` also gets the image path
    (to seed per-image perturbations). ``error`` is ``None`` for a good sample; for a frame that failed to
    load it is the message and ``pixel_values`` is ``None``.
    """

    def __init__(self, records: Sequence[FrameRecord], transform: Callable):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample = {
            "pixel_values": None,
            "label": torch.tensor(record.label, dtype=torch.long),
            "index": index,
            "path": record.path,
            "error": None,
        }
        try:
            rgb = load_rgb(record.path)
            rgb, label = self.prepare(rgb, record, index)  # may read other files (pseudo-fake donors)
        except DataError as err:
            sample["error"] = str(err)
            return sample
        if label != record.label:
            sample["label"] = torch.tensor(label, dtype=torch.long)
        if isinstance(self.transform, FrameTransform):
            sample["pixel_values"] = self.transform(rgb, key=record.path)
        else:
            sample["pixel_values"] = self.transform(rgb)
        return sample

    def prepare(self, rgb, record: FrameRecord, index: int):
        """``(rgb, label)`` of a loaded frame before its transform; subclasses may alter both.

        A :class:`DataError` raised here fails the sample (with its message), as a frame that cannot load.
        """
        return rgb, record.label


def collate_frames(batch: list[dict]) -> dict:
    """Stack the good samples; failed ones go to ``failed`` as ``(path, error)``.

    Returns ``{"pixel_values": (B, 3, S, S) or None if all failed, "label": (B,), "index": (B,),
    "failed": [(path, error), ...]}``.
    """
    good = [s for s in batch if s["error"] is None]
    failed = [(s["path"], s["error"]) for s in batch if s["error"] is not None]
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]) if good else None,
        "label": torch.stack([s["label"] for s in good]) if good else torch.empty(0, dtype=torch.long),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "failed": failed,
    }

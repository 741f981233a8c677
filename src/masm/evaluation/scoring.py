"""Run a detector over frames: P(fake) and log-odds of every record, failures counted, never replaced;
optionally spread over the processes of a ``torch.distributed`` group (:class:`Shard`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.calibration import log_odds_of_logits
from ..models.detector import fake_probability
from ..precision import autocast_for, resolve_device


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation spread over ``world_size`` processes (``torch.distributed``).

    Process ``rank`` scores records ``rank, rank + world_size, ...``; the scores are gathered on rank 0,
    which alone computes metrics and writes reports. Every process must make the same calls (collectives).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@torch.no_grad()
def score_records(
    detector: torch.nn.Module,
    records: Sequence[Any],
    transform,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = False,
    desc: str = "scoring",
    log_odds: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """P(fake) of every record (NaN for frames that failed to load) and the ``(path, reason)`` of failures.

    ``log_odds``, an array of one float64 per record, receives each frame's log-odds of "fake" (what a
    calibrated score is made from; P(fake) itself is computed exactly as before, in float32).
    """
    from torch.utils.data import DataLoader

    from ..data.dataset import FrameDataset, collate_frames

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    scores = np.full(len(records), np.nan, dtype=np.float64)
    failed: list[tuple[str, str]] = []
    if not records:
        return scores, failed
    loader = DataLoader(
        FrameDataset(records, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_tiles if getattr(transform, "tiled", False) else collate_frames,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # leave the global RNG alone (training resumes exactly)
    )
    was_training = detector.training
    detector.eval()
    bar = progress_bar(len(loader), desc, progress)
    try:
        for batch in loader:
            failed += [(str(path), _reason(err)) for path, err in batch["failed"]]
            if batch["pixel_values"] is not None and "tiles" in batch:
                frame_log_odds = _tiled_log_odds(detector, batch, device, precision, batch_size)
                scores[batch["index"].numpy()] = np.exp(-np.logaddexp(0.0, -frame_log_odds))  # sigmoid
                if log_odds is not None:
                    log_odds[batch["index"].numpy()] = frame_log_odds
            elif batch["pixel_values"] is not None:
                pixels = batch["pixel_values"].to(device, non_blocking=True)
                with autocast_for(device, precision):
                    logits = detector(pixels)
                probs = fake_probability(logits).cpu().double().numpy()
                scores[batch["index"].numpy()] = probs
                if log_odds is not None:
                    log_odds[batch["index"].numpy()] = log_odds_of_logits(logits).cpu().double().numpy()
            bar.update(1)
    finally:
        bar.close()
        detector.train(was_training)
    return scores, failed


def collate_tiles(batch: list[dict]) -> dict:
    """:func:`~masm.data.dataset.collate_frames` for a tiled transform (each sample ``(T, 3, S, S)``): the
    good samples' tiles one after another in ``pixel_values``, their counts in ``tiles``."""
    from ..data.dataset import collate_frames

    good = [s["pixel_values"] for s in batch if s["error"] is None]
    out = collate_frames([{**s, "pixel_values": torch.zeros(())} for s in batch])
    out["pixel_values"] = torch.cat(good) if good else None
    out["tiles"] = [len(tiles) for tiles in good]
    return out


def _tiled_log_odds(detector, batch: dict, device, precision: str, chunk: int) -> np.ndarray:
    """Each frame's log-odds from its tiles' (:func:`~masm.data.whole_image.combine_tile_log_odds`, as
    ``masm detect`` combines them), the tiles run ``chunk`` at a time so a batch of large images fits."""
    from ..data.whole_image import combine_tile_log_odds

    pixels = batch["pixel_values"]
    parts = []
    for start in range(0, len(pixels), chunk):
        with autocast_for(device, precision):
            logits = detector(pixels[start : start + chunk].to(device, non_blocking=True))
        parts.append(log_odds_of_logits(logits).cpu().double())
    tile_log_odds = torch.cat(parts).split(batch["tiles"])
    return np.array([combine_tile_log_odds(z.numpy()) for z in tile_log_odds], dtype=np.float64)


def score_sharded(
    detector: torch.nn.Module, records: Sequence[Any], transform, shard: Shard, **kwargs: Any
) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray] | None:
    """:func:`score_records` with the records split over processes: rank 0 gets every record's score,
    every failure and every log-odds value, in record order; the other ranks get None."""
    ids = list(range(shard.rank, len(records), shard.world_size))
    log_odds = np.full(len(ids), np.nan, dtype=np.float64)
    if shard.world_size > 1:
        kwargs["progress"] = kwargs.get("progress", False) and shard.is_main
    scores, failed = score_records(
        detector, [records[i] for i in ids], transform, log_odds=log_odds, **kwargs
    )
    if shard.world_size <= 1:
        return scores, failed, log_odds
    import torch.distributed as dist

    parts: list[Any] | None = [None] * shard.world_size if shard.is_main else None
    dist.gather_object((ids, scores, failed, log_odds), parts, dst=0)
    if not shard.is_main:
        return None
    full = np.full(len(records), np.nan, dtype=np.float64)
    full_log_odds = np.full(len(records), np.nan, dtype=np.float64)
    all_failed: list[tuple[str, str]] = []
    for part_ids, part_scores, part_failed, part_log_odds in parts:
        full[part_ids] = part_scores
        full_log_odds[part_ids] = part_log_odds
        all_failed += part_failed
    return full, all_failed, full_log_odds


def _reason(error: str) -> str:
    """A short reason for the skip summary (the first clause of the loader's message)."""
    text = str(error)
    return text.split(":")[-1].strip()[:80] or "unreadable frame"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

"""The data of a run: which frames train, validate and test, and the loader that feeds the training step.

Every training sample is seeded by (run seed, epoch, sample index), so it does not depend on the worker
that loads it or on where a run resumed; the sampler can skip the first samples of an epoch to resume in
the middle of one. A sample that fails to load or to forge (a corrupt frame, a corrupt pseudo-fake donor)
is returned as a failed sample and counted by the loop (:mod:`masm.training.failures`), never replaced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data.dataset import FrameDataset, collate_frames
from ..data.images import load_rgb
from ..data.index import FrameIndex, FrameRecord
from ..data.pseudo_fakes import PseudoFakeConfig, PseudoFakeMaker
from ..data.reencode import format_aligner
from ..data.sampling import derive_seed
from ..data.spec import open_dataset
from ..data.transforms import build_transform, resize_square
from ..errors import ConfigError, DataError
from .config import TrainConfig
from .state import worker_init_fn

DataArg = str | FrameIndex | Sequence[FrameRecord] | None


class TrainFrames(FrameDataset):
    """Training frames whose augmentation and pseudo-fakes are seeded by (run seed, epoch, sample index).

    With pseudo-fakes on, a real frame is resized to the input size and may become a forgery of itself
    (label 1) before the augmentation (:mod:`masm.data.pseudo_fakes`).
    """

    def __init__(self, records, transform, seed: int, pseudo_fakes: PseudoFakeConfig | None = None):
        super().__init__(records, transform)
        self.seed = seed
        # in shared memory: persistent DataLoader workers keep their copy of the dataset across epochs
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.pseudo_fakes = None
        if pseudo_fakes is not None and pseudo_fakes.enabled:
            donors = LazyImages([r.path for r in self.records if r.label == 0])
            self.pseudo_fakes = PseudoFakeMaker(pseudo_fakes, donors)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)  # before the epoch's iterator starts, so no worker reads the old value

    def __getitem__(self, index: int) -> dict:
        augmentation = getattr(self.transform, "augmentation", None)
        if augmentation is not None and hasattr(augmentation, "set_random_seed"):
            augmentation.set_random_seed(derive_seed(self.seed, f"{self.epoch}/{index}") % 2**32)
        return super().__getitem__(index)

    def prepare(self, rgb, record, index: int):
        if self.pseudo_fakes is None or record.label != 0:
            return rgb, record.label
        rng = np.random.default_rng(derive_seed(self.seed, f"pseudo-fake/{self.epoch}/{index}"))
        try:
            rgb, label, _ = self.pseudo_fakes(resize_square(rgb, self.transform.size), rng)
        except DataError as err:  # a donor that cannot be read names itself
            raise DataError(f"pseudo-fake of {record.path} failed: {err}") from None
        except Exception as err:  # any other failure to forge skips this sample, not the run; counted
            raise DataError(f"pseudo-fake of {record.path} failed: {type(err).__name__}: {err}") from None
        return rgb, label


class LazyImages:
    """A sequence of images loaded on access: the donors of spliced pseudo-fakes."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return load_rgb(self.paths[index])


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first samples of an epoch (to resume mid-epoch)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


# -- the data sets of a run ------------------------------------------------------------------------------
@dataclass
class RunData:
    train: FrameIndex
    val: FrameIndex | None
    tests: list[FrameIndex]


def open_run_data(config: TrainConfig, train_data=None, val_data=None, test_data=None) -> RunData:
    """The run's data sets: the config's specs, or in-memory data replacing them (see :func:`train`)."""
    d = config.data
    common = dict(data_root=d.data_root, compression=d.compression, label_dict=d.label_dict, seed=config.seed)
    if train_data is None and not d.train:
        raise ConfigError("data.train is not set (a data spec: dfb:PATH.json@train or folder:DIR)")
    source = train_data if train_data is not None else d.train
    if isinstance(source, str) and source.startswith("dfb:") and "@" not in source[4:]:
        source += "@train"  # a DeepfakeBench index trains on its train split unless told otherwise
    train = _as_index(source, "train", dict(common, frames_per_video=d.frames_train, balance=d.balance))
    if d.pseudo_fakes.enabled and d.pseudo_fakes.real_only:
        train = FrameIndex(train.name, [r for r in train.records if r.label == 0], train.source)
    _check_train_classes(train, d.pseudo_fakes.enabled)
    val = None
    val_source = val_data if val_data is not None else _val_spec(config)
    if val_source is not None:
        val = _as_index(val_source, "val", dict(common, frames_per_video=d.frames_test))
        _require_both_classes(val, "validation")
    tests = [
        _as_index(t, f"test{i}", dict(common, frames_per_video=d.frames_test))
        for i, t in enumerate(test_data if test_data is not None else d.test)
    ]
    if config.select_on == "test" and not tests:
        raise ConfigError("select_on: 'test' (DeepfakeBench parity) needs data.test")
    return RunData(train, val, tests)


def record_in_memory_data(config: TrainConfig, out: Path, train_data, val_data, test_data) -> dict[str, str]:
    """Write in-memory data to ``out/data/*.jsonl`` and point ``config`` at it (``frames:`` specs).

    Then the run's saved config trains again as it is. Returns {spec: file text} of what was (or would be)
    written, so a resume can compare it with what the run holds.
    """
    written: dict[str, str] = {}

    def spec_for(data, role: str) -> str | None:
        if data is None or isinstance(data, str):
            return data
        records = data.records if isinstance(data, FrameIndex) else list(data)
        path = out / "data" / f"{role}.jsonl"
        written[str(path)] = "".join(json.dumps(asdict(r)) + "\n" for r in records)
        return f"frames:{path}"

    if train_data is not None:
        config.data.train = spec_for(train_data, "train")
    if val_data is not None:
        config.data.val = spec_for(val_data, "val")
    if test_data is not None:
        config.data.test = [spec_for(t, f"test{i}") for i, t in enumerate(test_data)]
    return written


def _as_index(data: DataArg, name: str, open_kwargs: dict[str, Any]) -> FrameIndex:
    if isinstance(data, FrameIndex):
        return data
    if isinstance(data, str):
        return open_dataset(data, **open_kwargs)
    records = list(data or [])
    if not records:
        raise DataError(f"the {name} data is empty")
    return FrameIndex(name=name, records=records, source="in-memory")


def _val_spec(config: TrainConfig) -> str | None:
    val = config.data.val
    if val == "none":
        return None
    if val != "auto":
        return val
    train = config.data.train
    if not train.startswith("dfb:"):
        raise ConfigError(
            "data.val: 'auto' takes the training index's val split, which only DeepfakeBench indexes (dfb:) "
            "have; set data.val to a spec, or 'none' to train without validation"
        )
    path = train[4:].rpartition("@")[0] if "@" in train[4:] else train[4:]
    return f"dfb:{path}@val"


def _check_train_classes(index: FrameIndex, pseudo_fakes: bool) -> None:
    labels = {r.label for r in index.records}
    if pseudo_fakes and 0 not in labels:
        raise DataError(f"training set {index.name!r} has no real frames to make data.pseudo_fakes from")
    if not pseudo_fakes and labels != {0, 1}:
        only = "real" if labels == {0} else "fake"
        hint = " (enable data.pseudo_fakes to train from real frames alone)" if only == "real" else ""
        raise DataError(f"training set {index.name!r} ({index.source}) has only {only} frames{hint}")


def _require_both_classes(index: FrameIndex, role: str) -> None:
    labels = {r.label for r in index.records}
    if labels != {0, 1}:
        only = "real" if labels == {0} else "fake"
        raise DataError(
            f"{role} set {index.name!r} ({index.source}) has only {only} frames: frame AUC, the selection "
            "metric, is undefined"
        )


# -- the training loader ---------------------------------------------------------------------------------
@dataclass
class TrainLoader:
    """The training loader and the run's length in micro-batches and optimizer steps."""

    frames: TrainFrames
    sampler: ResumableSampler
    generator: torch.Generator
    loader: DataLoader
    per_rank_batch: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    def start_epoch(self, epoch: int, seed: int, skip_micro: int) -> None:
        """Seed the epoch's order and augmentation, skipping the micro-batches a resumed run has done."""
        self.sampler.set_epoch(epoch)
        self.frames.set_epoch(epoch)
        self.generator.manual_seed(derive_seed(seed, f"loader/{epoch}"))
        self.sampler.skip = skip_micro * self.per_rank_batch


def build_train_loader(config: TrainConfig, records, preprocessing, rank: int, world_size: int, device):
    cfg = config
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must divide evenly over {world_size} processes"
        )
    per_rank_batch = cfg.data.batch_size // world_size
    transform = build_transform(preprocessing, train=True, augment=cfg.data.augment, seed=cfg.seed)
    transform.reencode = format_aligner(cfg.data.align_format, cfg.data.align_format_quality)
    frames = TrainFrames(records, transform, cfg.seed, pseudo_fakes=cfg.data.pseudo_fakes)
    sampler = ResumableSampler(frames, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    generator = torch.Generator()
    loader = DataLoader(
        frames,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_frames,
        worker_init_fn=worker_init_fn,
        generator=generator,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,  # TrainFrames shares its epoch with the workers
    )
    micro_per_epoch = math.ceil(len(sampler) / per_rank_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.optim.grad_accum_steps)
    total = cfg.epochs * steps_per_epoch
    total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
    return TrainLoader(
        frames, sampler, generator, loader, per_rank_batch, micro_per_epoch, steps_per_epoch, total_steps
    )

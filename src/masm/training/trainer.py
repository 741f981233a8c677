"""The training loop behind ``masm train``: one device or many (``torchrun``), resumable at any step.

The trainer never branches on the fine-tuning method: it builds the detector with
:func:`~masm.models.create_detector`, trains its trainable parameters with Adam/AdamW on
:func:`~masm.method.total_loss`, and runs the :class:`~masm.method.SelectiveMaskController` when the method
has a mask. Outputs of a run in ``out_dir``::

    config.yaml             the resolved TrainConfig
    metrics.jsonl           one record per log step (loss terms, lr) and per validation
    masks.jsonl             the mask controller's log (ρ and mask per interval)
    checkpoints/last/       model + optimizer + mask + RNG state + data position (resumable)
    checkpoints/best/       the model with the best validation frame AUC
    eval/                   the best model's report on the test sets (when any are configured)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from ..config import to_dict
from ..data.dataset import FrameDataset, collate_frames
from ..data.images import load_rgb
from ..data.pseudo_fakes import PseudoFakeConfig, PseudoFakeMaker
from ..data.sampling import derive_seed
from ..data.spec import FrameIndex, FrameRecord, open_dataset
from ..data.transforms import build_transform, resize_square
from ..errors import CheckpointError, ConfigError, DataError, MasmError
from ..evaluation.evaluate import Shard, evaluate_detector, metrics_for, score_sharded
from ..evaluation.metrics import mean_over_datasets
from ..method import SelectiveMaskController, layer_groups, subspace_update, total_loss
from ..models.checkpoint import load_checkpoint, load_extra_tensors, read_checkpoint_config, save_checkpoint
from ..models.detector import Detector, create_detector
from ..precision import autocast_for, configure_matmul_precision
from . import distributed as dist_utils
from .config import TrainConfig, config_to_dict
from .state import (
    Progress,
    flatten_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
    unflatten_optimizer,
    worker_init_fn,
)

logger = logging.getLogger(__name__)

#: Environment variable naming a folder where every rank writes a hash of its final parameters and mask
#: (used by the multi-process test to show that the ranks agree).
STATE_HASH_ENV = "MASM_DEBUG_STATE_HASH_DIR"

DataArg = str | FrameIndex | Sequence[FrameRecord] | None


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    global_step: int
    epochs_completed: int
    best_metric: float | None  # frame AUC the best checkpoint was selected on (None: no selection data)
    best_step: int | None
    select_on: str
    val: dict[str, Any] | None = None  # the last validation: {dataset: evaluate_scores result}
    # evaluate_detector result of the best checkpoint on the test sets (rank 0; None on the other ranks)
    test: dict[str, Any] | None = None
    metrics_path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------------------------
class _TrainFrames(FrameDataset):
    """Training frames whose augmentation and pseudo-fakes are seeded by (run seed, epoch, sample index).

    That makes a sample independent of worker assignment and of where a run resumed. With pseudo-fakes on,
    a real frame is resized to the input size and may become a forgery of itself (label 1) before the
    augmentation (:mod:`masm.data.pseudo_fakes`).
    """

    def __init__(self, records, transform, seed: int, pseudo_fakes: PseudoFakeConfig | None = None):
        super().__init__(records, transform)
        self.seed = seed
        # in shared memory: persistent DataLoader workers keep their copy of the dataset across epochs
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.pseudo_fakes = None
        if pseudo_fakes is not None and pseudo_fakes.enabled:
            donors = _LazyImages([r.path for r in self.records if r.label == 0])
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
        rgb, label, _ = self.pseudo_fakes(resize_square(rgb, self.transform.size), rng)
        return rgb, label


class _LazyImages:
    """A sequence of images loaded on access: the donors of spliced pseudo-fakes."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return load_rgb(self.paths[index])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first samples of an epoch (to resume mid-epoch)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


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


@dataclass
class _Data:
    train: FrameIndex
    val: FrameIndex | None
    tests: list[FrameIndex]


def _open_data(config: TrainConfig, train_data, val_data, test_data) -> _Data:
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
    return _Data(train, val, tests)


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


# -- schedule --------------------------------------------------------------------------------------------
def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "none":
        return o.lr
    span = max(1, total_steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = config.optim
    if not params:
        raise ConfigError(f"method {config.model.method.name!r} leaves no trainable parameters")
    return make_optimizer(
        params, o.name, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )


def make_optimizer(params: list[torch.nn.Parameter], name: str = "adam", **kwargs) -> torch.optim.Optimizer:
    """Adam or AdamW, updating all parameters with ``fused`` kernels on CUDA and ``foreach`` elsewhere.

    MASM has 3·K small tensors per adapted layer (576 on ViT-B/16 with K = 4); torch's default on CPU is
    a Python loop over them, measured 1.6x slower than ``foreach``. On CUDA the ``fused`` kernel does the
    whole update in a few launches. On CPU ``fused`` is faster still, but a resumed run with it drifted from
    the uninterrupted one (7e-6 after 6 steps, where the other two agree to 1e-6), and resuming must
    reproduce the run. Parameters whose ``grad`` is None (paused subspaces) are skipped, so their values
    and moments stay as they were.
    """
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return cls(params, **({"fused": True} if on_cuda else {"foreach": True}), **kwargs)


# -- the run ---------------------------------------------------------------------------------------------
class _Run:
    """State of one training run; :func:`train` is its public face."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Path,
        env: dist_utils.DistEnv,
        progress_bar: bool,
        on_step: Callable[[Progress], None] | None,
    ):
        self.config = config
        self.out = out_dir
        self.env = env
        self.progress_bar = progress_bar and env.is_main
        self.on_step = on_step
        self.last_dir = out_dir / "checkpoints" / "last"
        self.best_dir = out_dir / "checkpoints" / "best"
        self.metrics_path = out_dir / "metrics.jsonl"
        self.progress = Progress()
        self.last_val: dict[str, Any] | None = None
        self.last_eval_step = -1
        self.saved_any = False
        self.frames_failed = 0
        self.group_terms: list[dict[str, torch.Tensor]] = []  # loss terms of the open accumulation group

    # setup ------------------------------------------------------------------------------------------------
    def build(self, data: _Data) -> None:
        cfg, env = self.config, self.env
        self.data = data
        configure_matmul_precision(env.device, cfg.tf32)
        with dist_utils.local_main_first(env):  # one SVD per weight per machine, then read from the cache
            self.detector: Detector = create_detector(
                cfg.model.backbone, cfg.model.method, preprocessing=cfg.model.preprocessing, seed=cfg.seed
            )
        cfg.model = self.detector.config  # resolved: preprocessing filled in from the backbone
        self.detector.to(env.device).train()
        masm_cfg = cfg.model.method.masm_config
        self.masm_cfg = masm_cfg
        self.layer_groups = layer_groups(self.detector)  # found once, not by a module walk every step
        self.controller = None
        if masm_cfg is not None and masm_cfg.mask.enabled:
            self.controller = SelectiveMaskController(self.detector, masm_cfg.mask, self.out / "masks.jsonl")
        self.optimizer = _make_optimizer(cfg, self.detector.trainable_parameters())
        self.model: torch.nn.Module = self.detector
        if env.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.detector,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False,  # frozen buffers (W_sem) are identical everywhere; do not resend
            )
        self._build_loader()

    def _build_loader(self) -> None:
        cfg, env = self.config, self.env
        if cfg.data.batch_size % env.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} must divide evenly over {env.world_size} processes"
            )
        self.per_rank_batch = cfg.data.batch_size // env.world_size
        transform = build_transform(
            self.detector.preprocessing, train=True, augment=cfg.data.augment, seed=cfg.seed
        )
        self.train_set = _TrainFrames(
            self.data.train.records, transform, cfg.seed, pseudo_fakes=cfg.data.pseudo_fakes
        )
        self.sampler = _ResumableSampler(
            self.train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed
        )
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.per_rank_batch,
            sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_frames,
            worker_init_fn=worker_init_fn,
            generator=self.generator,
            pin_memory=env.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,  # _TrainFrames shares its epoch with the workers
        )
        self.micro_per_epoch = math.ceil(len(self.sampler) / self.per_rank_batch)
        accum = cfg.optim.grad_accum_steps
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / accum)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total

    # checkpoints --------------------------------------------------------------------------------------------
    def _trainer_state(self) -> tuple[dict, dict]:
        opt_tensors, opt_skeleton = flatten_optimizer(self.optimizer)
        rng_tensors, rng_meta = rng_state()
        tensors = {"optimizer": opt_tensors, "rng": rng_tensors}
        if self.controller is not None:
            tensors["mask"] = self.controller.state_dict()
        state = {
            "progress": self.progress.to_json(),
            "optimizer": opt_skeleton,
            "scheduler": {
                "kind": self.config.optim.schedule,
                "step": self.progress.global_step,
                "total_steps": self.total_steps,
            },
            "rng": rng_meta,
            "world_size": self.env.world_size,
            "batch_size": self.config.data.batch_size,
            "last_eval_step": self.last_eval_step,
        }
        return tensors, {"trainer_state": state}

    def _info(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "global_step": self.progress.global_step,
            "epoch": self.progress.epoch,
            "seed": self.config.seed,
            "train_config": config_to_dict(self.config),
            "best_metric": self.progress.best_metric,
            "select_on": self.config.select_on,
        }

    def save_last(self) -> None:
        tensors, json_extra = self._trainer_state()  # every rank: keeps collectives (none) and RNG in step
        if self.env.is_main:
            save_checkpoint(
                self.detector,
                self.last_dir,
                extra_tensors=tensors,
                extra_json=json_extra,
                info=self._info("last"),
            )
        self.saved_any = True
        dist_utils.barrier(self.env)

    def save_best(self) -> None:
        if self.env.is_main:
            save_checkpoint(self.detector, self.best_dir, info=self._info("best"))
        dist_utils.barrier(self.env)

    def resume(self) -> bool:
        """Load ``checkpoints/last`` if there is one; returns whether the run resumed."""
        if not self.last_dir.is_dir():
            logger.info("no checkpoint in %s yet: starting from the beginning", self.last_dir)
            return False
        ckpt = read_checkpoint_config(self.last_dir)
        if (
            ckpt.get("backbone_fingerprint")
            and ckpt["backbone_fingerprint"] != self.detector.backbone_fingerprint
        ):
            raise CheckpointError(
                f"{self.last_dir}: trained on other backbone weights (fingerprint mismatch)"
            )
        state_path = self.last_dir / "trainer_state.json"
        if not state_path.is_file():
            raise CheckpointError(f"{self.last_dir}: no trainer_state.json, not a resumable checkpoint")
        state = json.loads(state_path.read_text())
        if (
            state.get("world_size") != self.env.world_size
            or state.get("batch_size") != self.config.data.batch_size
        ):
            raise CheckpointError(
                f"{self.last_dir}: written with {state.get('world_size')} processes and batch size "
                f"{state.get('batch_size')}; resume with the same (now {self.env.world_size}, "
                f"{self.config.data.batch_size}) to reproduce the data order"
            )
        weights = load_extra_tensors(self.last_dir, "model")
        missing, unexpected = self.detector.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(f"{self.last_dir}: unexpected tensor {unexpected[0]!r} for this model")
        trainable = {name for name, p in self.detector.named_parameters() if p.requires_grad}
        missing_trainable = [name for name in missing if name in trainable]
        if missing_trainable:
            raise CheckpointError(
                f"{self.last_dir / 'model.safetensors'}: trainable weight {missing_trainable[0]!r} is missing "
                f"({len(missing_trainable)} of {len(trainable)} missing); the checkpoint is incomplete"
            )
        self.optimizer.load_state_dict(
            unflatten_optimizer(load_extra_tensors(self.last_dir, "optimizer"), state["optimizer"])
        )
        if self.controller is not None:
            self.controller.load_state_dict(load_extra_tensors(self.last_dir, "mask"))
        set_rng_state(load_extra_tensors(self.last_dir, "rng"), state["rng"])
        self.progress = Progress.from_json(state["progress"])
        self.last_eval_step = state.get("last_eval_step", -1)
        self.saved_any = True
        if self.env.is_main:
            _truncate_jsonl(self.metrics_path, lambda r: r.get("step", 0) <= self.progress.global_step)
            _truncate_jsonl(self.out / "masks.jsonl", lambda r: r.get("step", 0) < self.progress.global_step)
        logger.info(
            "resumed from %s at step %d (epoch %d)",
            self.last_dir,
            self.progress.global_step,
            self.progress.epoch + 1,
        )
        return True

    # logging ----------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    # validation -------------------------------------------------------------------------------------------
    def _selection_sets(self) -> dict[str, FrameIndex]:
        if self.config.select_on == "test":
            return {f"{i}:{t.name}": t for i, t in enumerate(self.data.tests)}
        return {self.data.val.name: self.data.val} if self.data.val is not None else {}

    def validate(self) -> float | None:
        """Score the selection sets (sharded over ranks), log, and save ``best`` on improvement."""
        sets = self._selection_sets()
        if not sets:
            return None
        cfg, env = self.config, self.env
        transform = build_transform(self.detector.preprocessing, train=False, seed=cfg.seed)
        results: dict[str, dict] = {}
        for name, index in sets.items():
            scored = score_sharded(
                self.detector,
                index.records,
                transform,
                Shard(env.rank, env.world_size),
                batch_size=cfg.data.eval_batch_size,
                num_workers=cfg.data.num_workers,
                device=env.device,
                precision=cfg.precision,
                progress=False,
            )
            if scored is not None:  # rank 0
                results[name], _ = metrics_for(index.records, *scored)
        metric = None
        if env.is_main:
            metric = (
                mean_over_datasets(results)["frame"]["auc"]
                if len(results) > 1
                else next(iter(results.values()))["frame"]["auc"]
            )
            self.last_val = results
            self.log(
                {
                    "kind": "eval",
                    "step": self.progress.global_step,
                    "epoch": self._epoch_float(),
                    "select_on": cfg.select_on,
                    "metric": metric,
                    "sets": {
                        n: {"frame": r["frame"], "video": r["video"], "skipped": r["skipped"]["count"]}
                        for n, r in results.items()
                    },
                }
            )
        metric = dist_utils.broadcast_object(env, metric)
        self.last_eval_step = self.progress.global_step
        if metric is None:
            raise DataError("the selection sets have no defined frame AUC (one class only)")
        if self.progress.best_metric is None or metric > self.progress.best_metric:
            self.progress.best_metric, self.progress.best_step = metric, self.progress.global_step
            self.save_best()
        return metric

    def _epoch_float(self) -> float:
        return round(self.progress.epoch + self.progress.step_in_epoch / max(1, self.steps_per_epoch), 4)

    # training ---------------------------------------------------------------------------------------------
    def _micro_step(self, batch: dict, sync: bool, group_size: int) -> dict[str, torch.Tensor] | None:
        """Forward and backward of one micro-batch, its loss scaled by 1 / (micro-batches in its group).

        Nothing here waits for the device: the loss is checked with the gradients, once per step.
        """
        env, cfg = self.env, self.config
        self.frames_failed += len(batch["failed"])
        if batch["pixel_values"] is None:
            if env.distributed:
                raise DataError(f"every frame of a training batch failed to load, e.g. {batch['failed'][0]}")
            return None
        pixels = batch["pixel_values"].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
        context = contextlib.nullcontext() if sync or not env.distributed else self.model.no_sync()
        with context:
            with autocast_for(env.device, cfg.precision):
                logits = self.model(pixels)
            loss, terms = total_loss(logits, labels, self.detector, self.masm_cfg, self.layer_groups)
            (loss / group_size).backward()
        self.group_terms.append(terms)
        return terms

    def _check_finite(self) -> None:
        """Refuse the step when a loss of its group or a gradient is not finite, on any rank.

        Before the mask and the optimizer see the gradients, so neither Adam's moments nor the mask's running
        averages are poisoned. One all-reduce and one host sync per optimizer step.
        """
        env = self.env
        ok = torch.ones((), dtype=torch.bool, device=env.device)
        losses = [t["total"] for t in self.group_terms]
        loss_ok = torch.stack(losses).isfinite().all() if losses else ok
        grads = [p.grad for p in self.detector.trainable_parameters() if p.grad is not None]
        grad_ok = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all() if grads else ok
        bad_loss, bad_grad = dist_utils.any_true(env, torch.stack([~loss_ok, ~grad_ok]))
        terms, self.group_terms = self.group_terms, []
        if not (bad_loss or bad_grad):
            return
        where = f"at step {self.progress.global_step + 1} (epoch {self.progress.epoch + 1})"
        last = self.last_dir if self.saved_any else "none (no checkpoint was saved yet)"
        if bad_loss:
            bad = [t for t in terms if not torch.isfinite(t["total"])]
            detail = {k: float(v) for k, v in bad[0].items()} if bad else "on another rank"
            raise MasmError(f"loss is not finite {where}: {detail}; last good checkpoint: {last}")
        names = [
            name
            for name, p in self.detector.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        raise MasmError(
            f"gradient is not finite {where} although the loss is finite: parameter "
            f"{names[0] if names else '(on another rank)'!r}"
            + (f" and {len(names) - 1} more" if len(names) > 1 else "")
            + "; the step was refused (optimizer and mask state unchanged); lower optim.lr or use "
            f"precision: fp32; last good checkpoint: {last}"
        )

    def _optimizer_step(self) -> float:
        self._check_finite()
        lr = lr_at(self.progress.global_step, self.config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # gradients are DDP-averaged here. The guard projects them; the mask sets paused subspaces aside and
        # puts them back after the step; the guard holds exactly after Adam and weight decay.
        with subspace_update(self.detector, self.optimizer, self.controller, self.layer_groups):
            if self.config.optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    self.detector.trainable_parameters(), self.config.optim.max_grad_norm
                )
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _flush_log(self, sums: dict[str, torch.Tensor], count: int, lr: float, started: float) -> None:
        names = sorted(sums)
        values = torch.stack([sums[n] / max(1, count) for n in names]).float()
        if self.env.distributed:
            torch.distributed.all_reduce(values)
            values /= self.env.world_size
        self.log(
            {
                "kind": "train",
                "step": self.progress.global_step,
                "epoch": self._epoch_float(),
                "lr": lr,
                **{n: round(float(v), 6) for n, v in zip(names, values.tolist())},
                "frames_failed": self.frames_failed,
                "elapsed_s": round(time.time() - started, 2),
            }
        )

    def _reached_max(self) -> bool:
        return bool(self.config.max_steps) and self.progress.global_step >= self.config.max_steps

    def fit(self) -> None:
        cfg = self.config
        accum = cfg.optim.grad_accum_steps
        started = time.time()
        sums: dict[str, torch.Tensor] = {}
        count, lr = 0, lr_at(self.progress.global_step, cfg, self.total_steps)
        while self.progress.epoch < cfg.epochs and not self._reached_max():
            epoch = self.progress.epoch
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            self.generator.manual_seed(derive_seed(cfg.seed, f"loader/{epoch}"))
            skip_micro = self.progress.step_in_epoch * accum
            self.sampler.skip = skip_micro * self.per_rank_batch
            bar = self._bar(epoch)
            in_group = group_size = 0
            for micro, batch in enumerate(self.loader, start=skip_micro):
                if in_group == 0:  # the epoch's last group may hold fewer micro-batches
                    group_size = min(accum, self.micro_per_epoch - micro)
                in_group += 1
                closes_group = in_group == group_size
                terms = self._micro_step(batch, sync=closes_group, group_size=group_size)
                if terms is not None:
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                if not closes_group:
                    continue
                in_group = 0
                lr = self._optimizer_step()
                self.progress.global_step += 1
                self.progress.step_in_epoch += 1
                bar.update(1)
                if self.progress.global_step % cfg.log_every == 0 and count:
                    self._flush_log(sums, count, lr, started)
                    bar.set_postfix(loss=f"{float(sums['total']) / count:.4f}")
                    sums, count = {}, 0
                if (
                    cfg.eval_unit == "step"
                    and cfg.eval_every
                    and self.progress.global_step % cfg.eval_every == 0
                ):
                    self.validate()
                if cfg.checkpoint_every and self.progress.global_step % cfg.checkpoint_every == 0:
                    self.save_last()
                if self.on_step is not None:
                    self.on_step(self.progress)
                if self._reached_max():
                    break
            bar.close()
            if self._reached_max() and self.progress.step_in_epoch < self.steps_per_epoch:
                break
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            if cfg.eval_unit == "epoch" and cfg.eval_every and self.progress.epoch % cfg.eval_every == 0:
                self.validate()
            self.save_last()
        if count:
            self._flush_log(sums, count, lr, started)

    def _bar(self, epoch: int):
        from ..evaluation.evaluate import _progress_bar

        bar = _progress_bar(
            self.steps_per_epoch, f"epoch {epoch + 1}/{self.config.epochs}", self.progress_bar
        )
        if self.progress.step_in_epoch and hasattr(bar, "n"):
            bar.update(self.progress.step_in_epoch)
        return bar

    def finish(self) -> None:
        """Final validation if the last step was not validated, then the final ``last`` and ``best``."""
        if self._selection_sets() and self.last_eval_step != self.progress.global_step:
            self.validate()
        self.progress.finished = True
        self.save_last()
        if self.env.is_main and not self._selection_sets():  # nothing to select on: best = final model
            save_checkpoint(self.detector, self.best_dir, info=self._info("best"))
        dist_utils.barrier(self.env)
        _dump_state_hash(self)


def _truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop records a resumed run will write again (those after the checkpoint it resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def parameter_hash(detector: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(detector.named_parameters()):
        if p.requires_grad or name.startswith("head."):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _dump_state_hash(run: _Run) -> None:
    folder = os.environ.get(STATE_HASH_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {
        "rank": run.env.rank,
        "world_size": run.env.world_size,
        "params": parameter_hash(run.detector),
        "mask": run.controller.mask.int().tolist() if run.controller is not None else None,
        "global_step": run.progress.global_step,
    }
    (Path(folder) / f"rank{run.env.rank}.json").write_text(json.dumps(record))


def _check_resume_model(config: TrainConfig, last_dir: Path) -> None:
    """Refuse to resume a run whose checkpoint holds another model than the config asks for."""
    if not last_dir.is_dir():
        return
    saved = read_checkpoint_config(last_dir)["model"]
    wanted = to_dict(config.model)
    if wanted.get("preprocessing") is None:
        saved = {k: v for k, v in saved.items() if k != "preprocessing"}
        wanted = {k: v for k, v in wanted.items() if k != "preprocessing"}
    if saved.get("backbone") != wanted.get("backbone"):
        raise CheckpointError(
            f"{last_dir}: the checkpoint is of backbone {saved.get('backbone')!r}, the config asks for "
            f"{wanted.get('backbone')!r}"
        )
    if saved != wanted:
        diff = _first_difference(saved, wanted)
        raise CheckpointError(f"{last_dir}: the checkpoint's model config differs from the config at {diff}")


def _first_difference(a: Any, b: Any, where: str = "model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"{where} ({a!r} in the checkpoint, {b!r} in the config)"


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    *,
    progress: bool = True,
    train_data: DataArg = None,
    val_data: DataArg = None,
    test_data: Sequence[DataArg] | None = None,
    on_step: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train a detector as ``config`` says, writing the run to ``out_dir``; see the module doc.

    ``resume=True`` continues from ``out_dir/checkpoints/last`` (or starts fresh when the run was killed
    before its first checkpoint) and reaches the same parameters as an uninterrupted run. ``train_data``,
    ``val_data`` and ``test_data`` replace the config's specs with in-memory data (a spec string, a
    :class:`FrameIndex` or a list of :class:`FrameRecord`). ``on_step(progress)`` is called after every
    optimizer step (tests use it to interrupt a run). Launch under ``torchrun`` for DDP: an error on one
    rank then stops every rank (:mod:`masm.training.distributed`).
    """
    config = _copy_config(config)
    out = Path(out_dir)
    env = dist_utils.setup(config.device, config.dist_timeout_s)
    failed = True
    try:
        result = _train(config, out, resume, env, progress, train_data, val_data, test_data, on_step)
        failed = False
        return result
    except BaseException as err:
        first = dist_utils.report_failure(env, err)
        if first is not None:
            raise MasmError(f"rank {env.rank} stops because {first}") from err
        raise
    finally:
        dist_utils.cleanup(env, failed=failed)


def _copy_config(config: TrainConfig) -> TrainConfig:
    import copy

    return copy.deepcopy(config)


def _train(config, out, resume, env, progress, train_data, val_data, test_data, on_step) -> TrainResult:
    run = _Run(config, out, env, progress, on_step)
    if not resume and run.last_dir.exists():
        raise MasmError(
            f"{out} already holds a run (checkpoints/last); pass --resume or choose another --out"
        )
    if resume:
        _check_resume_model(config, run.last_dir)
    seed_everything(config.seed)
    data = _open_data(config, train_data, val_data, test_data)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for index, role in [(data.train, "train"), (data.val, "val"), *((t, "test") for t in data.tests)]:
            if index is not None:
                logger.info("%s: %s", role, index.describe())
    dist_utils.barrier(env)
    run.build(data)
    if env.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        if not resume:
            for name in ("metrics.jsonl", "masks.jsonl"):
                (out / name).unlink(missing_ok=True)
    if resume:
        run.resume()
    run.fit()
    run.finish()
    test = None
    if data.tests:  # every rank scores its share of the frames; rank 0 writes the report
        best = load_checkpoint(run.best_dir, device=env.device, merge=True)
        test = evaluate_detector(
            best,
            data.tests,
            out_dir=out / "eval",
            frames=config.data.frames_test,
            batch_size=config.data.eval_batch_size,
            num_workers=config.data.num_workers,
            seed=config.seed,
            device=env.device,
            precision=config.precision,
            progress=progress,
            shard=Shard(env.rank, env.world_size),
            meta={
                "checkpoint": str(run.best_dir),
                "seed": config.seed,
                "select_on": config.select_on,
                "best_step": run.progress.best_step,
                "config": config_to_dict(config),
            },
        )
    dist_utils.barrier(env)
    return TrainResult(
        out_dir=out,
        last_checkpoint=run.last_dir,
        best_checkpoint=run.best_dir,
        global_step=run.progress.global_step,
        epochs_completed=run.progress.epoch,
        best_metric=run.progress.best_metric,
        best_step=run.progress.best_step,
        select_on=config.select_on,
        val=run.last_val,
        test=test,
        metrics_path=run.metrics_path,
    )

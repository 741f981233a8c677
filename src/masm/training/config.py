"""Training configuration: every hyper-parameter of a run in one typed, documented place.

A run is described by :class:`TrainConfig`. YAML files overlay its defaults (a file may name ``base:``
files it extends), ``--set a.b=c`` overrides overlay the file, and :func:`train_config_from_dict` turns
the result into dataclasses, rejecting unknown keys and wrong types with the key's dotted name.

The fine-tuning method is chosen by ``model.method.name`` (a preset of :data:`masm.models.METHODS`); the
other keys under ``model.method`` overlay that preset, so ``method: {name: effort}`` or
``method: {masm: {num_subspaces: 2}}`` both work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import from_dict, load_yaml, merge_dicts, parse_overrides, to_dict
from ..data.pseudo_fakes import PseudoFakeConfig
from ..data.transforms import AugmentConfig
from ..errors import ConfigError
from ..models.detector import ModelConfig
from ..models.methods import method_config


@dataclass
class DataConfig:
    """Which frames train, validate and test a detector, and how they are loaded."""

    train: str = field(
        default="",
        metadata={
            "help": "training data spec: dfb:PATH.json[@split], folder:DIR, genimage:ROOT@train, univfd:ROOT"
        },
    )
    val: str = field(
        default="auto",
        metadata={
            "help": "validation data spec; 'auto' = the training index's val split (dfb only); 'none' = no "
            "validation (the last checkpoint is also the best)"
        },
    )
    test: list[str] = field(
        default_factory=list,
        metadata={"help": "test data specs, evaluated with the best checkpoint at the end"},
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "root that relative frame paths resolve against (default: the JSON's folder)"},
    )
    frames_train: int = field(default=8, metadata={"help": "frames per training video, evenly spaced"})
    frames_test: int = field(default=32, metadata={"help": "frames per validation/test video, evenly spaced"})
    compression: str = field(
        default="c23", metadata={"help": "FF++-family compression level: c23, c40 or raw"}
    )
    balance: bool = field(
        default=False, metadata={"help": "resample real training frames to as many as fakes"}
    )
    label_dict: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "extra label names -> 0 real / 1 fake, extending the standard map"},
    )
    batch_size: int = field(
        default=32, metadata={"help": "frames per optimizer micro-step over all devices (split across ranks)"}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "frames per forward pass in validation/test"})
    max_failed_share: float = field(
        default=0.01,
        metadata={
            "help": "stop the run when more training samples failed to load or forge than this share of "
            "an epoch's (or, later, of all seen) samples: then the data, not a file, is broken"
        },
    )
    num_workers: int = field(default=4, metadata={"help": "data-loading worker processes per device"})
    align_format: Literal["jpeg"] | None = field(
        default=None,
        metadata={
            "help": "re-encode every training image the same way (jpeg, at align_format_quality) after "
            "decoding, before augmentation, so a detector cannot learn real vs fake from the file format "
            "(GenImage: JPEG reals, PNG fakes); null = images as decoded. Check a detector with masm eval "
            "--bias-check"
        },
    )
    align_format_quality: int = field(
        default=95, metadata={"help": "JPEG quality (1-100) of align_format's re-encoding"}
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "training augmentation"})
    pseudo_fakes: PseudoFakeConfig = field(
        default_factory=PseudoFakeConfig,
        metadata={"help": "forgeries made on the fly from real training frames (self-blended images)"},
    )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adam", "adamw"] = field(default="adam", metadata={"help": "Adam (L2 decay) or AdamW"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    schedule: Literal["none", "cosine"] = field(
        default="none", metadata={"help": "constant learning rate, or cosine decay to min_lr_ratio * lr"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (optimizer steps)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr / peak lr of the cosine schedule"})
    grad_accum_steps: int = field(
        default=1, metadata={"help": "micro-batches accumulated per optimizer step"}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "clip the global gradient norm to this (null: no clipping)"}
    )


@dataclass
class TrainConfig:
    """A complete training run (method.md §5 defaults: FF++ c23, CLIP ViT-L/14, Adam 2e-4, 10 epochs)."""

    model: ModelConfig = field(
        default_factory=ModelConfig, metadata={"help": "backbone, method, preprocessing"}
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and loading"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule"})
    epochs: int = field(default=10, metadata={"help": "passes over the training frames"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many optimizer steps (null: run all epochs)"}
    )
    seed: int = field(default=1024, metadata={"help": "seed of every RNG (python, numpy, torch, data order)"})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU"}
    )
    device: str = field(
        default="auto", metadata={"help": "auto, cpu, cuda or cuda:N (DDP: the local rank's GPU)"}
    )
    tf32: bool = field(
        default=True,
        metadata={"help": "fp32 mode on CUDA: let matmuls use TF32 tensor cores (false: full fp32 products)"},
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "compile the model with torch.compile (MASM layers trace without a graph break); the "
            "first steps are slow while it compiles"
        },
    )
    cuda_graph: bool = field(
        default=False,
        metadata={
            "help": "CUDA: capture the whole training step (forward, backward, guard, mask, Adam) as one "
            "CUDA graph and replay it, so a step costs one launch instead of thousands; steps the graph "
            "cannot take (a batch with failed frames, the epoch's short last batch, a mask recompute) run "
            "eagerly, on every rank alike under DDP. Needs optim.grad_accum_steps: 1"
        },
    )
    dist_timeout_s: float | None = field(
        default=None,
        metadata={
            "help": "DDP: seconds any collective may wait for the slowest rank (null: $MASM_DIST_TIMEOUT_S, "
            "else 7200, long enough for the test sets' scoring)"
        },
    )
    log_every: int = field(default=10, metadata={"help": "optimizer steps between metrics.jsonl records"})
    eval_every: int = field(default=1, metadata={"help": "validate every N eval_unit (0: only at the end)"})
    eval_unit: Literal["epoch", "step"] = field(default="epoch", metadata={"help": "unit of eval_every"})
    checkpoint_every: int = field(
        default=500,
        metadata={"help": "optimizer steps between saves of checkpoints/last (0: epoch ends only)"},
    )
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "at the end, fit the best checkpoint's temperature and operating points (fpr=0.01, "
            "fpr=0.001, eer) on the validation split and store them with it (masm calibrate)"
        },
    )
    select_on: Literal["val", "test"] = field(
        default="val",
        metadata={
            "help": "select the best checkpoint on the validation split (protocol), or 'test' = mean test "
            "frame AUC (DeepfakeBench parity only: not a valid protocol)"
        },
    )

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "log_every": self.log_every >= 1,
            "eval_every": self.eval_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "data.batch_size": self.data.batch_size >= 1,
            "data.eval_batch_size": self.data.eval_batch_size >= 1,
            "data.num_workers": self.data.num_workers >= 0,
            "data.max_failed_share": 0.0 <= self.data.max_failed_share <= 1.0,
            "data.align_format_quality": 1 <= self.data.align_format_quality <= 100,
            "optim.grad_accum_steps": self.optim.grad_accum_steps >= 1,
            "optim.lr": self.optim.lr > 0,
            "optim.warmup_steps": self.optim.warmup_steps >= 0,
            "dist_timeout_s": self.dist_timeout_s is None or self.dist_timeout_s > 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"{bad[0]}: value {_get(self, bad[0])!r} is out of range")
        if self.cuda_graph and self.optim.grad_accum_steps != 1:
            raise ConfigError(
                f"cuda_graph: true captures a step of one micro-batch; optim.grad_accum_steps is "
                f"{self.optim.grad_accum_steps} (set it to 1, or cuda_graph: false)"
            )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def train_config_from_dict(data: dict[str, Any] | None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict (YAML overlay), naming any bad key."""
    data = copy.deepcopy(data or {})
    if not isinstance(data, dict):
        raise ConfigError("a training config must be a mapping")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    method = (model or {}).get("method")
    if method is not None:
        if not isinstance(method, dict):
            raise ConfigError(f"model.method: expected a mapping, got {method!r}")
        overrides = dict(method)
        name = overrides.pop("name", "masm")
        if not isinstance(name, str):
            raise ConfigError(f"model.method.name: expected a string, got {name!r}")
        try:
            model["method"] = method_config(name, overrides)
        except ConfigError as err:
            raise ConfigError(str(err).replace("'method.", "'model.method.")) from None
    return from_dict(TrainConfig, data)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file ``path`` (with its ``base:`` chain) <- ``overrides`` (``["a.b=3", ...]``)."""
    data = load_yaml(path) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    return train_config_from_dict(data)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``config.yaml`` of a run holds)."""
    return to_dict(config)

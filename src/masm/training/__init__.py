"""Training: typed run configs, the (DDP-capable, resumable) training loop and its checkpoint state.

``masm.training.train(config, out_dir, resume=False)`` is what ``masm train`` runs; demos and benchmarks
call it in-process.
"""

from .config import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    config_to_dict,
    load_train_config,
    train_config_from_dict,
)
from .optim import lr_at, make_optimizer
from .run_folder import config_from_run
from .trainer import DistributedFailure, TrainResult, train

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "DistributedFailure",
    "TrainResult",
    "config_from_run",
    "config_to_dict",
    "load_train_config",
    "lr_at",
    "make_optimizer",
    "train",
    "train_config_from_dict",
]

"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .config import TrainConfig


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a captured step reads it from the device: written in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def optimizer_for(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``config.optim`` describes, over ``params`` (the detector's trainable parameters);
    capturable (its step count and learning rate on the device) for ``cuda_graph: true``."""
    o = config.optim
    if not params:
        raise ConfigError(f"method {config.model.method.name!r} leaves no trainable parameters")
    return make_optimizer(
        params,
        o.name,
        capturable=config.cuda_graph,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )


def make_optimizer(
    params: list[torch.nn.Parameter], name: str = "adam", capturable: bool = False, **kwargs
) -> torch.optim.Optimizer:
    """Adam or AdamW with the ``fused`` kernel, on CUDA and on CPU.

    Fused: the whole update is a few kernels, and it skips a refused step on the device (the trainer sets
    ``optimizer.found_inf``, as ``torch.amp.GradScaler`` does), so a step never waits for the device to
    decide. On CPU its updates equal the multi-tensor (``foreach``) ones to float round-off (6e-8 apart after
    50 steps in a probe; in the quality benchmark LoRA's runs drifted within their seed spread).

    ``capturable``: for a step captured as a CUDA graph, the step count lives on the device and the
    learning rate is a device tensor, which :func:`set_lr` writes in place (a replay reads it from there).
    """
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    optimizer = cls(params, fused=True, capturable=capturable, **kwargs)
    if capturable:  # the optimizer's own value (given or default), as a device tensor
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=params[0].device)
    return optimizer

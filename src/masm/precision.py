"""Numeric precision per device: the autocast context and the fp32 matmul mode, shared by training,
evaluation and the benchmarks (neither imports the other for them).

``precision`` is a run's setting: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str = "auto", cache: bool = True):
    """bf16 autocast on CUDA under ``auto``/``bf16`` (and on CPU under ``bf16``); no autocast otherwise.

    ``cache=False`` for a step captured as a CUDA graph: autocast's cache of cast weights lives only as long
    as the context, so a replay would read casts freed after the capture (PyTorch's CUDA-graph notes).
    """
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def configure_matmul_precision(device: torch.device, tf32: bool = True) -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (Ampere and later), or forbid it.

    PyTorch's default is full fp32, several times slower on tensor-core GPUs; a fp32 run of a ViT loses
    nothing measurable to TF32's 10-bit mantissa in the products (accumulation stays fp32). Process-wide, as
    torch's own switch is; a no-op off CUDA.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32

"""One-off SVD of the targeted weights, cached by the weights' content.

ViT-L/14 has 96 attention projections of 1024×1024; their SVDs in float64 take tens of seconds on a CPU,
so each factorisation is stored once, keyed by a hash of the weight's bytes and the SVD precision. The key
does not include K or m: slicing the residual into subspaces is cheap and done at load time, so one cache
entry serves every MASM/Effort variant of the same backbone.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

# Total bytes of the entries kept in process memory, least recently used dropped first. Enough for a
# tiny model's every layer; an entry over 1/16 of it (ViT-L's) is only ever read from disk.
_MEMORY_LIMIT = 256 * 2**20
_memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()


@dataclass
class SVD:
    """``W = U diag(S) Vh`` with singular values in descending order (reduced SVD)."""

    U: torch.Tensor  # d_out × n
    S: torch.Tensor  # n
    Vh: torch.Tensor  # n × d_in


def default_cache_dir() -> Path:
    """``$MASM_CACHE_DIR`` or ``~/.cache/masm``."""
    root = os.environ.get("MASM_CACHE_DIR") or Path.home() / ".cache" / "masm"
    return Path(root)


def weight_key(weight: torch.Tensor, svd_dtype: str) -> str:
    data = weight.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(data.numpy().tobytes())
    digest.update(str(tuple(data.shape)).encode())
    return f"{digest.hexdigest()[:40]}-{svd_dtype}"


def decompose(weight: torch.Tensor, svd_dtype: str = "float64", cache_dir: Path | None | bool = None) -> SVD:
    """SVD of ``weight`` in ``svd_dtype`` (float32 or float64), from the cache when available.

    ``cache_dir=None`` uses :func:`default_cache_dir`; ``False`` disables the disk cache.
    """
    if svd_dtype not in ("float32", "float64"):
        raise ValueError(f"SVD precision must be float32 or float64, got {svd_dtype}")
    key = weight_key(weight, svd_dtype)
    if key in _memory:
        _memory.move_to_end(key)
        return SVD(*_memory[key])
    path = (
        None if cache_dir is False else Path(cache_dir or default_cache_dir()) / "svd" / f"{key}.safetensors"
    )
    factors = _read_entry(path) if path is not None else None
    if factors is None:
        dtype = getattr(torch, svd_dtype)
        U, S, Vh = torch.linalg.svd(weight.detach().to("cpu", dtype), full_matrices=False)
        factors = (U.contiguous(), S.contiguous(), Vh.contiguous())
        if path is not None:
            _write_entry(path, factors)
    _remember(key, factors)
    return SVD(*factors)


def _nbytes(factors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in factors)


def _remember(key: str, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Keep ``factors`` in memory, dropping the least recently used entries beyond ``_MEMORY_LIMIT``."""
    if _nbytes(factors) > _MEMORY_LIMIT // 16:
        return
    _memory[key] = factors
    total = sum(_nbytes(f) for f in _memory.values())
    while total > _MEMORY_LIMIT:
        _, dropped = _memory.popitem(last=False)
        total -= _nbytes(dropped)


def residual_groups(n: int, num_subspaces: int, rank: int, slicing: str) -> list[torch.Tensor]:
    """Indices of singular directions owned by each artifact subspace.

    The residual is the ``K·m`` smallest directions ``r..n-1``. ``contiguous`` gives subspace k the block
    ``r + k·m .. r + (k+1)·m - 1`` (subspace 0 holds the largest residual values); ``interleaved`` deals
    the directions round-robin so every subspace spans the whole residual spectrum.
    """
    total = num_subspaces * rank
    if total >= n:
        raise ValueError(f"K·m = {total} must be smaller than min(d_out, d_in) = {n}")
    residual = torch.arange(n - total, n)
    if slicing == "contiguous":
        return [residual[k * rank : (k + 1) * rank] for k in range(num_subspaces)]
    if slicing == "interleaved":
        return [residual[k::num_subspaces] for k in range(num_subspaces)]
    raise ValueError(f"unknown slicing {slicing!r}")


def _read_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        data = load_file(str(path))
        return data["U"], data["S"], data["Vh"]
    except (SafetensorError, KeyError, OSError) as err:
        logger.warning("ignoring unreadable SVD cache entry %s (%s); recomputing", path, err)
        return None


def _write_entry(path: Path, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(dict(zip(("U", "S", "Vh"), factors)), str(tmp))
        os.replace(tmp, path)  # atomic: concurrent ranks never see half a file
    except OSError as err:
        logger.warning("could not write SVD cache entry %s: %s", path, err)

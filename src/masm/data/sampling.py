"""Which frames of a video to use, and class balancing."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def sample_indices(total: int, num: int, mode: str = "linspace") -> list[int]:
    """Indices of ``num`` frames out of ``total``: evenly spread (``linspace``) or the ``first`` ``num``.

    ``num <= 0`` or ``num >= total`` keeps every frame. ``first`` is DeepfakeBench's behaviour, kept for
    parity with published tables.
    """
    if mode not in ("linspace", "first"):
        raise ValueError(f"frame sampling mode must be 'linspace' or 'first', got {mode!r}")
    if total <= 0:
        return []
    if num <= 0 or num >= total:
        return list(range(total))
    if mode == "first":
        return list(range(num))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, num)})


def sample_evenly(items: Sequence[T], num: int, mode: str = "linspace") -> list[T]:
    """``items`` at :func:`sample_indices`."""
    return [items[i] for i in sample_indices(len(items), num, mode)]


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from ``seed`` and a string key (e.g. an image path), stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def balance_indices(labels: Sequence[int], seed: int = 0) -> list[int]:
    """Indices that resample the real (0) items to as many as the fake (1) ones, fakes kept once each.

    Fewer reals than fakes: every real is kept and the rest drawn with replacement; more reals: a random
    subset without replacement. Deterministic for ``seed``. Order: all fakes and reals in original order,
    extra draws appended.
    """
    labels = np.asarray(labels)
    real = np.flatnonzero(labels == 0)
    fake = np.flatnonzero(labels == 1)
    if len(real) == 0 or len(fake) == 0 or len(real) == len(fake):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    if len(real) > len(fake):
        kept_real = np.sort(rng.choice(real, size=len(fake), replace=False))
        return sorted(np.concatenate([fake, kept_real]).tolist())
    extra = rng.choice(real, size=len(fake) - len(real), replace=True)
    return list(range(len(labels))) + extra.tolist()

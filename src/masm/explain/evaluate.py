"""Evaluation with example sheets: :mod:`masm.evaluation.evaluate` plus, per test set, the frames people
look at first, each with its explanation map (:mod:`.examples`).

The evaluation itself draws no maps (explanation is a layer above it); these two functions hand it the
sheet writer, so ``masm eval``, a training run's final evaluation and the demo write ``examples-NAME.png``
beside the report, as they always have.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..evaluation import evaluate as evaluation
from .examples import sheet_writer


def evaluate_detector(
    detector: torch.nn.Module, specs: Sequence[Any], *, examples: int = 4, **kwargs: Any
) -> dict[str, Any] | None:
    """:func:`masm.evaluation.evaluate.evaluate_detector` (same arguments and result); with ``out_dir``,
    ``examples-NAME.png`` per test set shows this many highest-scoring fakes, false alarms and misses,
    each with its explanation map (0: none)."""
    return evaluation.evaluate_detector(detector, specs, example_sheets=sheet_writer(examples), **kwargs)


def evaluate_checkpoint(
    checkpoint: str | Path, specs: Sequence[Any], *, examples: int = 4, **kwargs: Any
) -> dict[str, Any]:
    """:func:`masm.evaluation.evaluate.evaluate_checkpoint` with the example sheets of
    :func:`evaluate_detector` (``examples`` per group; 0: none)."""
    return evaluation.evaluate_checkpoint(checkpoint, specs, example_sheets=sheet_writer(examples), **kwargs)

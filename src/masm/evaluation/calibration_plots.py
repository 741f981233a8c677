"""Figures of calibration and operating points: the reliability diagram, and ROC curves on a log-FPR axis
with the stored operating points marked (where a deployment lives: false-alarm rates of 1 % and below)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MasmError
from .metrics import roc_points
from .plots import new_figure, save_figure


def _draw_reliability(ax, bins: Sequence[Mapping[str, float]], label: str, marker: str) -> None:
    centres = [b["mean_score"] for b in bins]
    observed = [b["fraction_fake"] for b in bins]
    sizes = [20 + 180 * b["n"] / max(1, max(x["n"] for x in bins)) for b in bins]
    ax.plot(centres, observed, marker=marker, linewidth=1, markersize=0, label=label)
    ax.scatter(centres, observed, s=sizes, marker=marker, alpha=0.6)


def plot_reliability(
    before: Sequence[Mapping[str, float]],
    after: Sequence[Mapping[str, float]],
    path: str | Path,
    *,
    ece: tuple[float, float] | None = None,
    title: str = "reliability",
) -> Path:
    """Reliability diagram: per score bin, mean P(fake) against the fraction of fakes, before and after
    calibration (marker area: the bin's share of samples). ``ece`` = (before, after) goes in the legend."""
    fig = new_figure(4.8, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfectly calibrated")
    names = ("raw", "calibrated")
    for bins, name, marker, value in zip((before, after), names, ("o", "s"), ece or (None, None)):
        _draw_reliability(ax, bins, name if value is None else f"{name} (ECE {value:.3f})", marker)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean P(fake) in the bin")
    ax.set_ylabel("fraction of fakes in the bin")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return save_figure(fig, path)


def plot_log_roc(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    points: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    *,
    title: str = "ROC, log false-positive rate",
) -> Path:
    """ROC curves (``{name: (labels, scores)}``) with FPR on a log axis; ``points`` ({name: [{"name", "fpr",
    "tpr"}, ...]}) marks the stored operating points where they fall on each curve."""
    if not curves:
        raise MasmError(f"no ROC curves to draw into {path}")
    fig = new_figure(5.4, 4.6)
    ax = fig.subplots()
    floor = 1e-3  # at least the decade of FPR 0.1 % on the axis
    for index, (name, (labels, scores)) in enumerate(curves.items()):
        labels = np.asarray(labels)
        if labels.min() == labels.max():
            ax.plot([], [], label=f"{name} (one class, no ROC)")
            continue
        fpr, tpr, _ = roc_points(labels, scores)
        n_real = int((labels == 0).sum())
        floor = min(floor, 0.5 / n_real)
        (line,) = ax.step(np.maximum(fpr, 0.5 / n_real), tpr, where="post", label=name)
        for op in (points or {}).get(name, []):
            if op.get("fpr") is None:
                continue
            ax.plot(max(op["fpr"], 0.5 / n_real), op["tpr"], marker="D", color=line.get_color())
            ax.annotate(
                op["name"],
                (max(op["fpr"], 0.5 / n_real), op["tpr"]),
                textcoords="offset points",
                xytext=(4, -10 - 8 * index),
                fontsize="x-small",
            )
    for rate in (0.001, 0.01):
        ax.axvline(rate, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (log; 0 drawn at half of 1/reals)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)

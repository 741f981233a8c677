"""Figures for reports: ROC curves, selective-mask heat maps, robustness curves.

matplotlib is imported lazily and only the non-interactive Agg backend is used, so plotting works on
headless machines and importing :mod:`masm.evaluation` stays cheap. Figures are built with
``matplotlib.figure.Figure`` rather than ``pyplot``, so no global figure state leaks between calls.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MasmError
from .metrics import binary_metrics, roc_points


def new_figure(width: float, height: float):
    """A Figure drawn by the Agg backend."""
    import matplotlib

    # switching backends while pyplot is live would close the caller's figures (e.g. in a notebook);
    # Figure.savefig below needs no pyplot backend at all
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _draw_roc(ax, curves: Mapping[str, tuple[Any, Any]], title: str) -> None:
    for name, (labels, scores) in curves.items():
        auc = binary_metrics(labels, scores)["auc"]
        if auc is None:
            ax.plot([], [], label=f"{name} (one class, no ROC)")
            continue
        fpr, tpr, _ = roc_points(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")


def plot_roc(
    curves: Mapping[str, tuple[Any, Any]], path: str | Path, video_curves: Mapping | None = None
) -> Path:
    """ROC curves of ``curves = {name: (labels, scores)}`` in one plot; returns ``path``.

    With ``video_curves`` (same layout, one entry per video) a second panel shows the video-level curves.
    A dataset with one class only gets a legend entry saying so instead of a curve.
    """
    if not curves:
        raise MasmError(f"no ROC curves to draw into {path}")
    panels = 2 if video_curves else 1
    fig = new_figure(5.0 * panels, 4.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _draw_roc(axes[0], curves, "frame level" if video_curves else "ROC")
    if video_curves:
        _draw_roc(axes[1], video_curves, "video level")
    return save_figure(fig, path)


def read_mask_log(masks_jsonl_path: str | Path) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """Read a selective-mask log: ``(steps, layers, active_share, mean_rho)``.

    Each JSON line is ``{"step", "layers", "rho": [[per subspace] per layer], "mask": [[0/1 ...] ...]}``.
    ``active_share`` and ``mean_rho`` have shape (layers, intervals); a layer absent from an interval is NaN.
    """
    path = Path(masks_jsonl_path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MasmError(f"cannot read mask log {path}: {err}") from err
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse_mask_record(line, f"{path}:{number}"))
    if not records:
        raise MasmError(f"mask log {path} has no entries")
    layers: list[str] = []
    for record in records:
        layers.extend(name for name in record["layers"] if name not in layers)
    row = {name: i for i, name in enumerate(layers)}
    share = np.full((len(layers), len(records)), np.nan)
    rho = np.full_like(share, np.nan)
    for col, record in enumerate(records):
        for name, layer_rho, layer_mask in zip(record["layers"], record["rho"], record["mask"]):
            share[row[name], col] = float(np.mean(layer_mask)) if len(layer_mask) else np.nan
            rho[row[name], col] = float(np.mean(layer_rho)) if len(layer_rho) else np.nan
    return [int(r["step"]) for r in records], layers, share, rho


def _parse_mask_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MasmError(f"{where}: not valid JSON ({err.msg})") from err
    missing = [key for key in ("step", "layers", "rho", "mask") if key not in record]
    if missing:
        raise MasmError(f"{where}: mask log entry lacks {', '.join(missing)}")
    n = len(record["layers"])
    if len(record["rho"]) != n or len(record["mask"]) != n:
        raise MasmError(
            f"{where}: {n} layers but {len(record['rho'])} rho rows and {len(record['mask'])} mask rows"
        )
    return record


def plot_mask_heatmap(masks_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Two heat maps from a selective-mask log: share of active subspaces and mean rho per layer over steps.

    x = training step of each mask interval, y = layer. Returns ``out_png``.
    """
    steps, layers, share, rho = read_mask_log(masks_jsonl_path)
    fig = new_figure(max(6.0, 0.25 * len(steps) + 4.0), 2.0 + 2 * max(1.5, 0.22 * len(layers)))
    axes = fig.subplots(2, 1, sharex=True)
    panels = ((share, "share of active subspaces", (0.0, 1.0)), (rho, "mean rho", (None, None)))
    for ax, (values, title, (vmin, vmax)) in zip(axes, panels):
        image = ax.imshow(
            np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax
        )
        fig.colorbar(image, ax=ax, label=title)
        ax.set_title(title)
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), labels=layers, fontsize="x-small")
    ticks = _thin_ticks(len(steps))
    axes[-1].set_xticks(ticks, labels=[str(steps[i]) for i in ticks], fontsize="small")
    axes[-1].set_xlabel("step")
    return save_figure(fig, out_png)


def _thin_ticks(n: int, most: int = 12) -> list[int]:
    stride = max(1, math.ceil(n / most))
    return list(range(0, n, stride))


def robustness_means(table: Mapping[str, Mapping[int, Mapping[str, float | None]]]) -> dict[str, dict]:
    """``{perturbation: {level: mean AUC over datasets or None}}``, levels sorted; None AUCs are left out."""
    means: dict[str, dict] = {}
    for name, levels in table.items():
        means[name] = {}
        for level in sorted(levels, key=int):
            values = [float(v) for v in levels[level].values() if v is not None]
            means[name][int(level)] = float(np.mean(values)) if values else None
    return means


def plot_robustness(table: Mapping[str, Mapping[int, Mapping[str, float | None]]], path: str | Path) -> Path:
    """One line per perturbation: mean AUC over datasets against level (0 = clean). Returns ``path``."""
    if not table:
        raise MasmError(f"no robustness results to draw into {path}")
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    all_levels: set[int] = set()
    for name, levels in robustness_means(table).items():
        all_levels.update(levels)
        points = [(level, auc) for level, auc in levels.items() if auc is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(sorted(all_levels))
    ax.set_xlabel("perturbation level (0 = clean)")
    ax.set_ylabel("AUC (mean over datasets)")
    ax.set_title("robustness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)

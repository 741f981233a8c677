"""The part of an evaluation report a deployment reads: detection rate at fixed false-alarm rates,
calibration error, and what the stored operating points give on each test set (Markdown and a log-FPR
ROC figure). Numbers come from :func:`masm.evaluation.calibration.deployment_metrics`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .calibration_plots import plot_log_roc
from .report_table import format_table

LEVELS = (("frame", "frames"), ("video", "videos"))


def _tpr_cell(entry: Mapping[str, Any]) -> str:
    if entry.get("tpr") is None:
        return f"n/a ({entry['n_real']} reals)"
    return f"{entry['tpr']:.4f} ({entry['n_real']} reals)"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def deployment_section(datasets: Mapping[str, Mapping]) -> str:
    """Markdown: per level, a table of TPR at FPR 1 % / 0.1 %, ECE and Brier per test set, then the stored
    operating points' FPR and TPR on each test set beside the values they had where they were chosen."""
    with_block = {name: r["deployment"] for name, r in datasets.items() if "deployment" in r}
    if not with_block:
        return ""
    first = next(iter(with_block.values()))
    which = (
        f"calibrated score (temperature {first['temperature']:.4f})"
        if first["calibrated"]
        else "raw score (no calibration stored with this detector)"
    )
    parts = [
        "## For deployment\n",
        f"On the detector's {which}. TPR at FPR: the oracle threshold on each set.\n",
    ]
    for level, unit in LEVELS:
        rows = []
        for name, block in with_block.items():
            if level not in block:
                continue
            tpr = block[level]["tpr_at_fpr"]
            rows.append(
                [
                    name,
                    _tpr_cell(tpr["0.01"]),
                    _tpr_cell(tpr["0.001"]),
                    block[level]["ece"],
                    block[level]["brier"],
                ]
            )
        if rows:
            parts.append(f"### {level.capitalize()} level\n")
            parts.append(format_table(rows, ["Dataset", "TPR @ FPR 1 %", "TPR @ FPR 0.1 %", "ECE", "Brier"]))
        points = [
            [
                name,
                op_name,
                f"{op['threshold']:.4f}",
                _rate(op["chosen_on"]["fpr"]),
                _rate(op["fpr"]),
                _signed(op["fpr_drift"]),
                _rate(op["chosen_on"]["tpr"]),
                _rate(op["tpr"]),
                op["n_real"],
            ]
            for name, block in with_block.items()
            for op_name, op in block.get(level, {}).get("operating_points", {}).items()
        ]
        if points:
            chosen_on = next(iter(with_block.values()))[level]["operating_points"]
            data = next(iter(chosen_on.values()))["chosen_on"]["data"]
            parts.append(
                f"Stored operating points ({unit}), chosen on {data}: the false-alarm rate each threshold "
                "gives on a new test set, and its drift from where it was chosen.\n"
            )
            headers = [
                "Dataset",
                "Point",
                "Threshold",
                "FPR chosen",
                "FPR here",
                "FPR drift",
                "TPR chosen",
                "TPR here",
                f"Real {unit}",
            ]
            parts.append(format_table(points, headers))
    return "\n".join(parts)


def write_log_roc(
    path: Path, predictions: Mapping[str, Sequence[tuple]], datasets: Mapping[str, Mapping]
) -> Path | None:
    """Frame-level ROC curves of every test set on a log-FPR axis, each stored operating point marked where
    its threshold falls on that set (the ROC of the calibrated score is the raw one's: same order)."""
    curves, points = {}, {}
    for name, rows in predictions.items():
        if not rows:
            continue
        _, _, labels, scores = zip(*rows)
        curves[name] = (np.asarray(labels), np.asarray(scores, dtype=np.float64))
        stored = datasets.get(name, {}).get("deployment", {}).get("frame", {}).get("operating_points", {})
        points[name] = [
            {"name": op_name, "fpr": op["fpr"], "tpr": op["tpr"]} for op_name, op in stored.items()
        ]
    if not curves:
        return None
    return plot_log_roc(curves, path, points)

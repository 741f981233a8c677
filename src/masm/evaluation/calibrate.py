"""Calibrate a detector on labelled data and store the result with it: the library behind ``masm calibrate``
and the trainer's last step.

:func:`calibrate_detector` scores the data (log-odds per frame), fits the temperature and the operating
points (:func:`~masm.evaluation.calibration.fit_calibration`) and writes a report: ``calibration.json``
(everything, with ECE and Brier score before and after), ``calibration.md``, ``reliability.png`` and
``roc-log.png`` (the ROC on a log-FPR axis with the chosen points). :func:`calibrate_checkpoint` does it for
a checkpoint directory and writes the calibration into the checkpoint's ``config.json``; its weights are
not touched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MasmError
from ..models.calibration import Calibration
from ..precision import resolve_device
from .calibration import check_calibration_labels, expit, fit_calibration
from .calibration_plots import plot_log_roc, plot_reliability
from .report_table import format_table
from .scoring import Shard, score_sharded


def score_for_calibration(
    detector: torch.nn.Module,
    index: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = False,
    shard: Shard | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """``(log_odds, labels, videos)`` of the frames of ``index`` that could be scored (rank 0; None on the
    other ranks of a sharded run). A frame that fails to load is left out, as in evaluation."""
    from ..data.transforms import build_transform

    transform = build_transform(detector.preprocessing, train=False)
    scored = score_sharded(
        detector,
        index.records,
        transform,
        shard or Shard(),
        batch_size=batch_size,
        num_workers=num_workers,
        device=resolve_device(device) if not isinstance(device, torch.device) else device,
        precision=precision,
        progress=progress,
        desc=f"{index.name} [calibration]",
    )
    if scored is None:
        return None
    scores, _, log_odds = scored
    ok = ~np.isnan(scores)
    records = [r for r, good in zip(index.records, ok) if good]
    if not records:
        raise MasmError(f"{index.name}: no frame could be scored for calibration")
    labels = np.asarray([int(r.label) for r in records], dtype=np.int64)
    return log_odds[ok], labels, [r.video for r in records]


def calibrate_detector(
    detector: torch.nn.Module,
    index: Any,
    *,
    out_dir: str | Path | None = None,
    points: Sequence[str] | None = None,
    default: str | None = None,
    lenient: bool = False,
    **scoring: Any,
) -> tuple[Calibration, list[str]] | None:
    """Fit ``detector``'s calibration on the frames of ``index`` (a :class:`~masm.data.index.FrameIndex`);
    returns ``(calibration, notes)`` on rank 0 (None elsewhere) and, with ``out_dir``, writes the report.
    ``lenient``: an operating point the data cannot support is skipped with a note, not refused."""
    labels = [int(r.label) for r in index.records]
    check_calibration_labels(labels, points=points, data=index.name, lenient=lenient)
    scored = score_for_calibration(detector, index, **scoring)
    if scored is None:
        return None
    log_odds, labels, videos = scored
    calibration, notes = fit_calibration(
        log_odds, labels, videos=videos, points=points, default=default, data=index.name, lenient=lenient
    )
    if out_dir is not None:
        write_calibration_report(out_dir, calibration, notes, log_odds, labels)
    return calibration, notes


def calibrate_checkpoint(
    checkpoint: str | Path,
    specs: Sequence[str],
    *,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    frames: int = 32,
    compression: str = "c23",
    points: Sequence[str] | None = None,
    default: str | None = None,
    device: str | None = None,
    **scoring: Any,
) -> dict[str, Any]:
    """Calibrate the detector in ``checkpoint`` on the data ``specs`` (several are pooled into one set)
    and store the calibration in the checkpoint. Returns ``{"calibration", "notes", "report"}``."""
    from ..data.spec import open_dataset
    from ..models.checkpoint import write_calibration
    from ..models.factory import load_checkpoint

    if not specs:
        raise MasmError("no calibration data given (use --data SPEC)")
    indexes = [
        open_dataset(str(spec), data_root=data_root, frames_per_video=frames, compression=compression, seed=0)
        for spec in specs
    ]
    index = indexes[0] if len(indexes) == 1 else _pooled(indexes)
    detector = load_checkpoint(checkpoint, device=resolve_device(device), merge=True)
    fitted = calibrate_detector(
        detector, index, out_dir=out_dir, points=points, default=default, device=device, **scoring
    )
    assert fitted is not None  # one process
    calibration, notes = fitted
    write_calibration(checkpoint, calibration)
    report = Path(out_dir) / "calibration.json" if out_dir is not None else None
    return {"calibration": calibration, "notes": notes, "report": report}


def _pooled(indexes: Sequence[Any]) -> Any:
    """One index holding the frames of several (their names joined)."""
    from ..data.index import FrameIndex

    records = [r for index in indexes for r in index.records]
    return FrameIndex(" + ".join(i.name for i in indexes), records)


def write_calibration_report(
    out_dir: str | Path,
    calibration: Calibration,
    notes: Sequence[str],
    log_odds: np.ndarray,
    labels: np.ndarray,
) -> Path:
    """``calibration.json``, ``calibration.md``, ``reliability.png`` and ``roc-log.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"calibration": calibration.to_dict(), "notes": list(notes)}
    (out / "calibration.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    before, after = calibration.metrics["before"], calibration.metrics["after"]
    plot_reliability(
        calibration.metrics["bins_before"],
        calibration.metrics["bins_after"],
        out / "reliability.png",
        ece=(before["ece"], after["ece"]),
        title=f"reliability on {calibration.fitted_on}",
    )
    scores = expit(log_odds / calibration.temperature)
    frame_points = [
        {"name": op.name, "fpr": op.fpr, "tpr": op.tpr}
        for op in calibration.operating_points
        if op.level == "frame"
    ]
    plot_log_roc(
        {calibration.fitted_on: (labels, scores)}, out / "roc-log.png", {calibration.fitted_on: frame_points}
    )
    (out / "calibration.md").write_text(calibration_markdown(calibration, notes), encoding="utf-8")
    return out / "calibration.json"


def calibration_markdown(calibration: Calibration, notes: Sequence[str]) -> str:
    """What was fitted, in a page a person reads."""
    before, after = calibration.metrics["before"], calibration.metrics["after"]
    parts = [
        "# Calibration\n",
        f"Fitted on {calibration.fitted_on}: {calibration.n_real} real and {calibration.n_fake} fake frames. "
        f"Temperature {calibration.temperature:.4f} (calibrated score = sigmoid(log-odds / T)).\n",
        format_table(
            [["raw", before["ece"], before["brier"]], ["calibrated", after["ece"], after["brier"]]],
            ["Score", "ECE (15 bins)", "Brier"],
        ),
        "## Operating points (label fake when score >= threshold)\n",
        format_table(
            [
                [
                    op.name + (" (default)" if op.name == calibration.default else ""),
                    op.level,
                    f"{op.threshold:.6f}",
                    op.fpr,
                    op.fpr_upper95,
                    op.tpr,
                    op.n_real,
                    op.n_fake,
                ]
                for op in calibration.operating_points
            ],
            ["Point", "Level", "Threshold", "FPR", "FPR 95 % upper", "TPR", "Reals", "Fakes"],
        ),
        "![reliability](reliability.png) ![ROC, log FPR](roc-log.png)\n",
    ]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)

"""Evaluation: detection metrics, report files and figures.

:mod:`~masm.evaluation.metrics` is the one place metrics are computed (training, evaluation, benchmarks);
:mod:`~masm.evaluation.report` writes report.json/.md, predictions.csv and figures;
:mod:`~masm.evaluation.plots` draws ROC curves, selective-mask heat maps and robustness curves.
"""

from .metrics import (
    binary_metrics,
    evaluate_scores,
    mean_over_datasets,
    roc_points,
    summarize_skipped,
    video_scores,
)
from .plots import plot_mask_heatmap, plot_robustness, plot_roc
from .report import format_table, write_eval_report, write_robustness_report

__all__ = [
    "binary_metrics",
    "evaluate_scores",
    "format_table",
    "mean_over_datasets",
    "plot_mask_heatmap",
    "plot_robustness",
    "plot_roc",
    "roc_points",
    "summarize_skipped",
    "video_scores",
    "write_eval_report",
    "write_robustness_report",
]

"""The benchmark's summary over seeds and its tables.

``summarize`` gives, per method, the mean and standard deviation over seeds of each generator's frame
accuracy (P(fake) >= 0.5), AP and AUC, and of their mean over the generators unseen in training; the
tables show one metric each as "mean ± std", a column per generator (the training one marked) and the mean
over the unseen ones, then what the method trained, how far it moved the attention weights and how long.
"""

from __future__ import annotations

import statistics

from .runs import METRICS

TITLES = {"auc": "AUC", "ap": "AP", "acc": "accuracy @ 0.5"}


def _mean_std(values: list[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    return {
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarize(runs: list[dict]) -> dict[str, dict]:
    """``{method: {"n", "trainable_params", "train_seconds", "attn_weight_change", "generators": {gen:
    {metric: {"mean", "std"}}}, "mean_unseen": {metric: {"mean", "std"}}}}`` over the seeds of each method
    (train seconds and weight change: mean over seeds)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        generators = list(group[0]["generators"])
        out[method] = {
            "n": len(group),
            "trainable_params": group[0]["trainable_params"],
            "train_seconds": statistics.mean(r["train_seconds"] for r in group),
            "attn_weight_change": statistics.mean(r["attn_weight_change"] for r in group),
            "generators": {
                g: {k: _mean_std([r["generators"][g][k] for r in group]) for k in METRICS} for g in generators
            },
            "mean_unseen": {k: _mean_std([r["mean_unseen"][k] for r in group]) for k in METRICS},
        }
    return out


def _pm(entry: dict) -> str:
    return "n/a" if entry["mean"] is None else f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def format_metric_table(summary: dict[str, dict], metric: str, train_generator: str) -> str:
    """One metric's table: a row per method, a column per generator and the mean over the unseen ones."""
    from ...evaluation.report import format_table

    if not summary:
        return ""
    generators = list(next(iter(summary.values()))["generators"])
    headers = [
        "method",
        *[f"{g} (train)" if g == train_generator else g for g in generators],
        "mean unseen",
        "attention ΔW/W",
        "trainable params",
        "train s",
        "seeds",
    ]
    rows = [
        [
            method,
            *[_pm(e["generators"][g][metric]) for g in generators],
            _pm(e["mean_unseen"][metric]),
            f"{e['attn_weight_change']:.4f}",
            e["trainable_params"],
            f"{e['train_seconds']:.0f}",
            e["n"],
        ]
        for method, e in summary.items()
    ]
    return format_table(rows, headers)


def format_summary(summary: dict[str, dict], train_generator: str) -> str:
    """The AUC, AP and accuracy tables, each under its title."""
    return "\n".join(
        f"**{TITLES[m]}** (frame level; trained on {train_generator})\n\n"
        + format_metric_table(summary, m, train_generator)
        for m in ("auc", "ap", "acc")
    )

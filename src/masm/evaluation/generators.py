"""Per-generator numbers, as the AI-generated-image benchmarks report them.

GenImage, UniversalFakeDetect and Chameleon tables give, per generator, that generator's reals against its
own fakes (GenImage pairs every generator with its own ImageNet reals): accuracy at a fixed threshold, on
all images and on reals and fakes apart, average precision and ROC AUC, then their mean over generators.
An evaluation computes them when every scored frame names its generator (``family``), reals included, as
the readers of :mod:`masm.data.genimage` and :mod:`masm.data.univfd` do. Face datasets, whose reals carry
no family, keep their per-family rows (each family's fakes against all reals) and get none of these.

The accuracy's threshold is the detector's stored default operating point, on its calibrated score, when it
has one (:func:`masm.models.calibration.resolve_decisions`, as ``masm detect`` labels), else 0.5 on the raw
score. AP and AUC do not depend on a threshold and are taken on the raw score, as the rest of the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..models.calibration import Calibration, resolve_decisions
from .calibration import expit
from .metrics import binary_metrics
from .report_table import format_table

#: The numbers reported per generator, and averaged over generators.
GENERATOR_METRICS = ("acc", "acc_real", "acc_fake", "ap", "auc")


def has_generators(labels: Sequence[int], families: Sequence[str | None]) -> bool:
    """Whether every frame names its generator, and some real frame does (the reals are paired)."""
    return bool(families) and all(f is not None for f in families) and any(int(y) == 0 for y in labels)


def decision_scores(
    scores: np.ndarray, log_odds: np.ndarray | None, calibration: Calibration | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The scores the accuracy thresholds, and the decision as the report names it.

    A stored default operating point thresholds the calibrated score ``sigmoid(log_odds / T)``; without one
    (or without log-odds) the raw score is labelled at 0.5.
    """
    if calibration is not None and calibration.default is not None and log_odds is not None:
        decision = resolve_decisions(calibration)["frame"]
        calibrated = expit(np.asarray(log_odds, dtype=np.float64) / calibration.temperature)
        return calibrated, {"name": decision.name, "threshold": decision.threshold, "score": "calibrated"}
    plain = resolve_decisions(None)["frame"]
    return np.asarray(scores, dtype=np.float64), {
        "name": plain.name,
        "threshold": plain.threshold,
        "score": "raw",
    }


def generator_metrics(
    labels: Sequence[int],
    scores: Any,
    families: Sequence[str],
    *,
    decided: Any | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per generator (sorted) its reals against its fakes, and the mean over generators.

    ``scores`` (raw) give AP and AUC; ``decided`` (default: ``scores``) thresholded at ``threshold`` give the
    accuracies. Returns ``{"per_generator": {name: {"n_real", "n_fake", "acc", "acc_real", "acc_fake", "ap",
    "auc"[, "note"]}}, "mean": {metric: mean or None, "n_generators", "n_contributing": {metric: count}}}``;
    a generator with one class has ``None`` AP/AUC (and accuracy of the missing class), left out of means.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    raw = np.asarray(scores, dtype=np.float64).reshape(-1)
    chosen = raw if decided is None else np.asarray(decided, dtype=np.float64).reshape(-1)
    names = np.asarray([str(f) for f in families], dtype=object)
    per_generator: dict[str, dict[str, Any]] = {}
    for generator in sorted(set(names.tolist())):
        rows = names == generator
        ranked = binary_metrics(y[rows], raw[rows], unit="images")
        labelled = binary_metrics(y[rows], chosen[rows], threshold, unit="images")
        entry = {"n_real": ranked["n_real"], "n_fake": ranked["n_fake"]}
        entry.update({m: labelled[m] for m in ("acc", "acc_real", "acc_fake")})
        entry.update(ap=ranked["ap"], auc=ranked["auc"])
        if "note" in ranked:
            entry["note"] = ranked["note"]
        per_generator[generator] = entry
    return {"per_generator": per_generator, "mean": mean_over_generators(per_generator)}


def mean_over_generators(per_generator: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the generators that have it (``None`` when none has), and how many did."""
    mean: dict[str, Any] = {"n_generators": len(per_generator)}
    counts = {}
    for metric in GENERATOR_METRICS:
        values = [float(e[metric]) for e in per_generator.values() if e.get(metric) is not None]
        mean[metric] = float(np.mean(values)) if values else None
        counts[metric] = len(values)
    mean["n_contributing"] = counts
    return mean


def generators_block(
    labels: Sequence[int],
    scores: np.ndarray,
    families: Sequence[str],
    log_odds: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """A test set's ``"generators"`` entry: the decision used and :func:`generator_metrics` under it."""
    decided, decision = decision_scores(scores, log_odds, calibration)
    result = generator_metrics(labels, scores, families, decided=decided, threshold=decision["threshold"])
    return {"decision": decision, **result}


def generator_rows(block: Mapping[str, Any]) -> list[list[Any]]:
    """Table rows: one per generator, then the mean over generators."""
    rows = [
        [name, *(entry[m] for m in GENERATOR_METRICS), entry["n_real"], entry["n_fake"]]
        for name, entry in block["per_generator"].items()
    ]
    mean = block["mean"]
    rows.append(
        [f"mean over {mean['n_generators']} generators", *(mean[m] for m in GENERATOR_METRICS), "", ""]
    )
    return rows


GENERATOR_HEADERS = ["Generator", "ACC", "ACC real", "ACC fake", "AP", "AUC", "Real images", "Fake images"]


def generators_section(datasets: Mapping[str, Mapping]) -> str:
    """Markdown: per test set whose frames name their generators, a row per generator and their mean."""
    with_block = {name: r["generators"] for name, r in datasets.items() if "generators" in r}
    if not with_block:
        return ""
    parts = [
        "## Per generator\n",
        "Each generator's reals against its own fakes, as GenImage, UniversalFakeDetect and Chameleon report "
        "them. A mean averages the generators that have the metric (one-class generators have no AP/AUC).\n",
    ]
    for name, block in with_block.items():
        decision = block["decision"]
        if decision["score"] == "raw":
            how = f"Accuracy at {decision['threshold']:g} on the raw score."
        else:
            how = (
                f"Accuracy at the stored operating point {decision['name']} (threshold "
                f"{decision['threshold']:.4f} on the calibrated score)."
            )
        parts.append(f"### {name}\n\n{how}\n")
        parts.append(format_table(generator_rows(block), GENERATOR_HEADERS))
    return "\n".join(parts)

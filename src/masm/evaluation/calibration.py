"""Calibration and operating points: from labelled scores to a :class:`~masm.models.calibration.Calibration`.

- :func:`fit_temperature`: one scalar ``T`` on the log-odds, fitted by negative log-likelihood (temperature
  scaling, Guo et al. 2017);
- :func:`expected_calibration_error` (15 equal-width bins of the score) and :func:`brier_score`;
- :func:`tpr_at_fpr` and :func:`choose_operating_point`: the highest detection rate whose false-alarm rate
  stays at or under a target, and the threshold that holds it;
- :func:`fit_calibration`: all of it for one data set, at frame and (for video data) video level;
- :func:`stored_point_rates`: what the stored thresholds give on another data set (the drift a deployment
  lives by).

Thresholds are placed halfway between two neighbouring distinct scores, so a score computed elsewhere
(ONNX, float32) that differs in the last bits falls on the same side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import MasmError
from ..models.calibration import (
    Calibration,
    OperatingPoint,
    canonical_operating_point,
    parse_operating_point,
)
from .metrics import cumulative_counts, video_scores

#: Bins of the expected calibration error (Guo et al. use 15).
ECE_BINS = 15

#: Operating points fitted when none are named: ``fpr=0.001`` only where the data have enough reals.
DEFAULT_POINTS = ("fpr=0.01", "fpr=0.001", "eer")

#: Operating points that are skipped (with a note), not refused, when the data have too few reals.
OPTIONAL_POINTS = ("fpr=0.001",)


def expit(x: np.ndarray) -> np.ndarray:
    """Logistic function, stable for any magnitude, in float64."""
    from scipy.special import expit as _expit

    return _expit(np.asarray(x, dtype=np.float64))


# -- temperature scaling ----------------------------------------------------------------------------------


def _nll(log_odds: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of ``sigmoid(z / T)`` against the labels."""
    signed = np.where(labels == 1, -log_odds, log_odds) / temperature
    return float(np.mean(np.logaddexp(0.0, signed)))


def fit_temperature(log_odds: Any, labels: Any) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``sigmoid(log_odds / T)``; needs both classes.

    The NLL is convex in ``1/T``; a bounded Brent search over ``log T`` in [1e-3, 1e3] finds it to 1e-6.
    """
    z = np.asarray(log_odds, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if z.size != y.size or z.size == 0 or not np.isfinite(z).all():
        raise MasmError("temperature scaling needs one finite log-odds value per label")
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=(math.log(1e-3), math.log(1e3)),
        method="bounded",
        options={"xatol": 1e-9},
    )
    return float(math.exp(found.x))


# -- calibration metrics ----------------------------------------------------------------------------------


def expected_calibration_error(labels: Any, scores: Any, bins: int = ECE_BINS) -> float:
    """ECE of P(fake): ``bins`` equal-width bins of the score over [0, 1] (the last one closed); per bin
    ``|mean score - fraction fake|``, weighted by the bin's share of the samples."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    which = np.minimum((s * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.sum() / s.size * abs(s[in_bin].mean() - y[in_bin].mean())
    return float(total)


def brier_score(labels: Any, scores: Any) -> float:
    """Mean squared difference between P(fake) and the 0/1 label."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return float(np.mean((s - y) ** 2))


def reliability_bins(labels: Any, scores: Any, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin: its range, sample count, mean score and fraction fake (the reliability diagram)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    which = np.minimum((s * bins).astype(np.int64), bins - 1)
    out = []
    for b in np.unique(which):
        in_bin = which == b
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": int(in_bin.sum()),
                "mean_score": float(s[in_bin].mean()),
                "fraction_fake": float(y[in_bin].mean()),
            }
        )
    return out


def calibration_metrics(labels: Any, scores: Any) -> dict:
    """``{"ece", "brier"}`` of P(fake) scores."""
    return {"ece": expected_calibration_error(labels, scores), "brier": brier_score(labels, scores)}


# -- operating points -------------------------------------------------------------------------------------


def min_reals_for(target_fpr: float) -> int:
    """Reals needed to estimate a false-positive rate of ``target_fpr``: enough that one false alarm is
    allowed (with fewer, the threshold only says "above every real seen")."""
    return math.ceil(1.0 / target_fpr - 1e-9)


def _both_classes(y: np.ndarray, where: str, unit: str) -> tuple[int, int]:
    n_fake = int(y.sum())
    n_real = int(y.size - n_fake)
    if n_real == 0 or n_fake == 0:
        only = "real" if n_fake == 0 else "fake"
        raise MasmError(f"{where}: only {only} {unit} ({y.size}); calibration needs both reals and fakes")
    return n_real, n_fake


def _cut(y: np.ndarray, s: np.ndarray, kind: str, target: float | None) -> tuple[float, float, float]:
    """``(threshold, fpr, tpr)`` of the operating point: for ``fpr``, the lowest cut whose FPR is at most
    ``target``; for ``eer``, the cut where FPR and FNR are closest (the first such, from the top)."""
    tps, fps, distinct = cumulative_counts(y, s)  # predicted fake: score >= distinct[i], descending
    fpr = fps / fps[-1]
    tpr = tps / tps[-1]
    if kind == "fpr":
        ok = np.flatnonzero(fpr <= target + 1e-12)
        if ok.size == 0:  # even the top score is a real's beyond the allowance: label nothing fake
            top = float(distinct[0])
            threshold = (top + 1.0) / 2.0 if top < 1.0 else float(np.nextafter(top, np.inf))
            return threshold, 0.0, 0.0
        i = int(ok[-1])
    else:
        i = int(np.argmin(np.abs(fpr - (1.0 - tpr))))
    # halfway down to the next lower distinct score: the same labels on these data, with a margin
    lower = float(distinct[i + 1]) if i + 1 < distinct.size else float(distinct[i]) - 1e-9
    threshold = (float(distinct[i]) + lower) / 2.0
    return threshold, float(fpr[i]), float(tpr[i])


def fpr_upper_bound(false_alarms: int, n_real: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a false-positive rate seen as ``false_alarms / n_real``."""
    if false_alarms >= n_real:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, false_alarms + 1, n_real - false_alarms))


def choose_operating_point(
    labels: Any, scores: Any, name: str, *, level: str = "frame", data: str = "data"
) -> OperatingPoint:
    """The threshold of operating point ``name`` (``fpr=0.01``, ``eer``) on calibrated ``scores``.

    Too few reals for an ``fpr=`` target (see :func:`min_reals_for`), or one class only, is an error naming
    ``data`` and the count.
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    unit = "videos" if level == "video" else "frames"
    n_real, n_fake = _both_classes(y, data, unit)
    kind, target = parse_operating_point(name)
    if kind == "fpr" and n_real < min_reals_for(target):
        raise MasmError(
            f"{data}: {n_real} real {unit}, too few for operating point {canonical_operating_point(name)} "
            f"(needs at least {min_reals_for(target)})"
        )
    threshold, fpr, tpr = _cut(y, s, kind, target)
    return OperatingPoint(
        name=canonical_operating_point(name),
        level=level,
        threshold=threshold,
        fpr=fpr,
        tpr=tpr,
        n_real=n_real,
        n_fake=n_fake,
        fpr_upper95=fpr_upper_bound(round(fpr * n_real), n_real),
        data=data,
    )


def tpr_at_fpr(labels: Any, scores: Any, target_fpr: float) -> dict:
    """The highest TPR whose FPR is at most ``target_fpr`` on these data (an oracle threshold, as ROC
    analysis reads it), with the reals it rests on. ``tpr`` is None (and ``note`` says why) when there are
    fewer reals than :func:`min_reals_for` asks, or one class only."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_fake = int(y.sum())
    n_real = int(y.size - n_fake)
    out: dict[str, Any] = {"target_fpr": target_fpr, "tpr": None, "n_real": n_real, "n_fake": n_fake}
    if n_real == 0 or n_fake == 0:
        out["note"] = "one class only"
    elif n_real < min_reals_for(target_fpr):
        out["note"] = f"{n_real} reals, fewer than the {min_reals_for(target_fpr)} this rate needs"
    else:
        _, _, out["tpr"] = _cut(y, s, "fpr", target_fpr)
    return out


def rates_at(labels: Any, scores: Any, threshold: float) -> dict:
    """FPR and TPR of ``score >= threshold`` on these data (None for a class that is absent)."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    fake = s >= threshold
    n_fake = int(y.sum())
    n_real = int(y.size - n_fake)
    return {
        "fpr": float(fake[y == 0].mean()) if n_real else None,
        "tpr": float(fake[y == 1].mean()) if n_fake else None,
        "n_real": n_real,
        "n_fake": n_fake,
    }


# -- one data set -> a Calibration ------------------------------------------------------------------------


def check_calibration_labels(
    labels: Any, *, points: Sequence[str] | None = None, data: str = "calibration data", lenient: bool = False
) -> None:
    """Refuse, before anything is scored, data that cannot be calibrated on: one class only, or fewer
    reals than a named (or, unless ``lenient``, a non-optional default) operating point needs."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    n_real, _ = _both_classes(y, data, "frames")
    if lenient:
        return
    for name in points if points is not None else DEFAULT_POINTS:
        kind, target = parse_operating_point(name)
        optional = points is None and canonical_operating_point(name) in OPTIONAL_POINTS
        if kind == "fpr" and n_real < min_reals_for(target) and not optional:
            raise MasmError(
                f"{data}: {n_real} real frames, too few for operating point {canonical_operating_point(name)} "
                f"(needs at least {min_reals_for(target)})"
            )


def fit_calibration(
    log_odds: Any,
    labels: Any,
    *,
    videos: Sequence[str] | None = None,
    points: Sequence[str] | None = None,
    default: str | None = None,
    data: str = "calibration data",
    lenient: bool = False,
) -> tuple[Calibration, list[str]]:
    """Temperature and operating points fitted on one labelled data set; returns ``(calibration, notes)``.

    ``points`` default to :data:`DEFAULT_POINTS`, of which those in :data:`OPTIONAL_POINTS` are skipped
    with a note when the data have too few reals; a point named explicitly is refused then. With
    ``videos`` (one key per frame, and at least one video with more than one frame), the points are also
    chosen at video level on the mean calibrated frame score of each video. ``default`` (the point a
    deployment uses) defaults to the first point fitted. ``lenient`` skips (with a note) every point the
    data cannot support, named or not (the trainer's end-of-run calibration).
    """
    z = np.asarray(log_odds, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if z.size != y.size or z.size == 0:
        raise MasmError(f"{data}: one log-odds value per label needed ({z.size} values, {y.size} labels)")
    if not np.isfinite(z).all():
        raise MasmError(f"{data}: {int((~np.isfinite(z)).sum())} scores are NaN or infinite")
    n_real, n_fake = _both_classes(y, data, "frames")
    explicit = points is not None
    names = [canonical_operating_point(p) for p in (points if explicit else DEFAULT_POINTS)]
    temperature = fit_temperature(z, y)
    raw, calibrated = expit(z), expit(z / temperature)
    metrics = {
        "before": calibration_metrics(y, raw),
        "after": calibration_metrics(y, calibrated),
        "bins_before": reliability_bins(y, raw),
        "bins_after": reliability_bins(y, calibrated),
    }
    levels = [("frame", y, calibrated)]
    if videos is not None:
        keys, v_labels, v_scores = video_scores(videos, y, calibrated)
        if len(keys) < y.size:  # a data set of single images has no video level of its own
            levels.append(("video", v_labels, v_scores))
    notes: list[str] = []
    chosen: list[OperatingPoint] = []
    for name in names:
        for level, level_labels, level_scores in levels:
            try:
                chosen.append(
                    choose_operating_point(level_labels, level_scores, name, level=level, data=data)
                )
            except MasmError as err:
                if not lenient and (explicit or name not in OPTIONAL_POINTS):
                    raise
                notes.append(f"{name} ({level} level) not stored: {str(err).split(': ', 1)[1]}")
    fitted = {op.name for op in chosen if op.level == "frame"}
    if default is not None and canonical_operating_point(default) not in fitted:
        raise MasmError(f"default operating point {default!r} was not fitted (fitted: {sorted(fitted)})")
    default_name = (
        canonical_operating_point(default) if default else next((n for n in names if n in fitted), None)
    )
    calibration = Calibration(
        temperature=temperature,
        operating_points=chosen,
        default=default_name,
        fitted_on=data,
        n_real=n_real,
        n_fake=n_fake,
        metrics=metrics,
    )
    return calibration, notes


def stored_point_rates(
    calibration: Calibration, labels: Any, scores: Any, level: str = "frame"
) -> dict[str, dict]:
    """Per stored operating point at ``level``: its threshold, the FPR/TPR it had where it was chosen and
    the FPR/TPR it gives on these (calibrated) ``scores``, and the drift of the FPR between the two."""
    out = {}
    for op in calibration.operating_points:
        if op.level != level:
            continue
        here = rates_at(labels, scores, op.threshold)
        drift = None if here["fpr"] is None else here["fpr"] - op.fpr
        out[op.name] = {
            "threshold": op.threshold,
            "chosen_on": {"data": op.data, "fpr": op.fpr, "tpr": op.tpr, "n_real": op.n_real},
            **here,
            "fpr_drift": drift,
        }
    return out


#: False-positive rates whose detection rate every evaluation reports.
REPORTED_FPRS = (0.01, 0.001)


def deployment_metrics(
    labels: Any, log_odds: Any, videos: Sequence[str] | None = None, calibration: Calibration | None = None
) -> dict:
    """What a deployment measures, on the detector's calibrated score (its raw one without calibration).

    Per level (``frame``; ``video`` with ``videos``, the mean calibrated frame score of each video): ECE,
    Brier score, TPR at each FPR of :data:`REPORTED_FPRS` (with the reals it rests on) and, with a
    ``calibration`` that stores operating points, the FPR and TPR each gives here and its drift from where
    it was chosen (a video is judged at the video-level point, else at the frame-level one, as
    ``masm detect`` does).
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    temperature = calibration.temperature if calibration else 1.0
    scores = expit(np.asarray(log_odds, dtype=np.float64).reshape(-1) / temperature)
    out: dict[str, Any] = {"calibrated": calibration is not None, "temperature": temperature}
    levels = {"frame": (y, scores)}
    if videos is not None:
        _, v_labels, v_scores = video_scores(videos, y, scores)
        levels["video"] = (v_labels, v_scores)
    for level, (level_labels, level_scores) in levels.items():
        block: dict[str, Any] = calibration_metrics(level_labels, level_scores)
        block["tpr_at_fpr"] = {
            f"{rate:g}": tpr_at_fpr(level_labels, level_scores, rate) for rate in REPORTED_FPRS
        }
        if calibration is not None and calibration.operating_points:
            stored_level = level if any(op.level == level for op in calibration.operating_points) else "frame"
            block["operating_points"] = stored_point_rates(
                calibration, level_labels, level_scores, stored_level
            )
        out[level] = block
    return out

"""Detection metrics: the one implementation used by training, evaluation and benchmarks.

Scores are "fakeness" (higher means more likely fake); labels are 0 = real, 1 = fake. ROC AUC, average
precision and the equal error rate are computed here with numpy (the tests cross-check them against
scikit-learn), so the training loop does not pay for importing scikit-learn. Every returned number is a
plain Python ``float``/``int`` or ``None``, so results go straight into JSON; a metric that is undefined
(one class only) is ``None`` with a ``note`` saying why, never NaN.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import MasmError

#: How many skipped samples a report lists by name.
MAX_SKIPPED_EXAMPLES = 5

#: The metrics averaged over datasets by :func:`mean_over_datasets`.
MEAN_METRICS = ("auc", "ap", "eer", "acc")


def _as_arrays(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int labels in {0, 1}, finite float scores), both 1-D and of equal length."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise MasmError(f"labels and scores differ in length: {y.size} labels, {s.size} scores")
    if y.size == 0:
        raise MasmError("no samples to score: labels and scores are empty")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise MasmError(f"labels must be 0 (real) or 1 (fake); found {y[bad][0]!r} ({int(bad.sum())} such)")
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        first = int(np.flatnonzero(nonfinite)[0])
        raise MasmError(f"{int(nonfinite.sum())} scores are NaN or infinite (first at index {first})")
    return y.astype(np.int64), s


def roc_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with one point per distinct score, starting at (0, 0).

    A sample counts as fake when ``score >= threshold``; tied scores move along one (diagonal) segment.
    The first threshold is ``inf``. Needs both classes; raises :class:`MasmError` otherwise.
    """
    y, s = _as_arrays(labels, scores)
    tps, fps, thresholds = cumulative_counts(y, s)
    if tps[-1] == 0 or fps[-1] == 0:
        raise MasmError("a ROC curve needs both real and fake samples")
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each distinct score, in decreasing score order."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # the last index of each run of equal scores: ties are decided together
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    return tps, fps, s_sorted[last_of_run]


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """Step-wise AP (sum of precision times recall increase), the definition scikit-learn uses."""
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Where FPR equals FNR, interpolated linearly on the ROC segment that crosses FPR = 1 - TPR."""
    gap = fpr - (1.0 - tpr)  # -1 at (0, 0), +1 at (1, 1), non-decreasing in between
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def binary_metrics(labels: Any, scores: Any, threshold: float = 0.5, *, unit: str = "samples") -> dict:
    """AUC, AP, EER and accuracies of fakeness ``scores`` against 0/1 ``labels``.

    Returns ``{"n", "n_real", "n_fake", "auc", "ap", "eer", "acc", "acc_real", "acc_fake", "threshold"}``.
    A sample is predicted fake when ``score >= threshold``. ``acc_real``/``acc_fake`` are the accuracies on
    the samples labelled real/fake (``None`` when there are none). With one class only, ``auc``, ``ap`` and
    ``eer`` are ``None`` and ``note`` says why; ``unit`` names the samples in that note ("frames",
    "videos"). Empty or invalid input raises :class:`MasmError`.
    """
    y, s = _as_arrays(labels, scores)
    predicted_fake = s >= threshold
    is_fake = y == 1
    n_fake = int(is_fake.sum())
    n_real = int(y.size - n_fake)
    result: dict[str, Any] = {
        "n": int(y.size),
        "n_real": n_real,
        "n_fake": n_fake,
        "auc": None,
        "ap": None,
        "eer": None,
        "acc": float(np.mean(predicted_fake == is_fake)),
        "acc_real": _ratio(int(np.sum(~predicted_fake & ~is_fake)), n_real),
        "acc_fake": _ratio(int(np.sum(predicted_fake & is_fake)), n_fake),
        "threshold": float(threshold),
    }
    if n_real == 0 or n_fake == 0:
        only = "real" if n_fake == 0 else "fake"
        result["note"] = f"only {only} {unit} (n={y.size}): AUC undefined"
        return result
    tps, fps, _ = cumulative_counts(y, s)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    result["auc"] = _auc(fpr, tpr)
    result["ap"] = _average_precision(tps, fps)
    result["eer"] = _eer(fpr, tpr)
    return result


def video_scores(videos: Sequence[str], labels: Any, scores: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean frame score per video key, in order of each video's first frame.

    Returns ``(video_keys, video_labels, video_scores)``. A video whose frames carry different labels is
    an error that names the video.
    """
    y, s = _as_arrays(labels, scores)
    keys = [str(v) for v in videos]
    if len(keys) != y.size:
        raise MasmError(f"videos and labels differ in length: {len(keys)} video keys, {y.size} labels")
    index: dict[str, int] = {}
    video_label: list[int] = []
    for key, label in zip(keys, y.tolist()):
        slot = index.setdefault(key, len(index))
        if slot == len(video_label):
            video_label.append(label)
        elif video_label[slot] != label:
            raise MasmError(f"video {key!r} has frames labelled both real and fake")
    slots = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    sums = np.bincount(slots, weights=s, minlength=len(index))
    counts = np.bincount(slots, minlength=len(index))
    return list(index), np.asarray(video_label, dtype=np.int64), sums / counts


def summarize_skipped(skipped: Any = None) -> dict:
    """``{"count", "reasons": {reason: count}, "examples": [{"path", "reason"}, ...]}`` of skipped samples.

    ``skipped`` is ``None``, a mapping ``path -> reason``, an iterable of ``(path, reason)`` pairs or of
    ``{"path": ..., "reason": ...}`` dicts, or an already summarised dict (returned as is).
    """
    if skipped is None:
        return {"count": 0, "reasons": {}, "examples": []}
    if isinstance(skipped, Mapping) and {"count", "reasons"} <= set(skipped):
        return dict(skipped)
    pairs = skipped.items() if isinstance(skipped, Mapping) else skipped
    items = [_skipped_pair(entry) for entry in pairs]
    reasons = Counter(reason for _, reason in items)
    return {
        "count": len(items),
        "reasons": dict(reasons.most_common()),
        "examples": [{"path": p, "reason": r} for p, r in items[:MAX_SKIPPED_EXAMPLES]],
    }


def _skipped_pair(entry: Any) -> tuple[str, str]:
    if isinstance(entry, Mapping):
        return str(entry.get("path", "")), str(entry.get("reason", "unknown"))
    if isinstance(entry, Iterable) and not isinstance(entry, str):
        parts = list(entry)
        if len(parts) == 2:
            return str(parts[0]), str(parts[1])
    raise MasmError(f"a skipped sample must be (path, reason) or {{'path', 'reason'}}, got {entry!r}")


def family_metrics(
    videos: Sequence[str], labels: Any, scores: Any, families: Sequence[str | None], threshold: float = 0.5
) -> dict[str, dict]:
    """Per forgery family, that family's fakes against every real of the test set, frame and video level.

    Returns ``{family: {"frame": binary_metrics, "video": binary_metrics}}`` in sorted order of the
    families the fakes carry (``{}`` when none carries one; fakes without a family count in the pooled
    numbers only). A real's family, if any, is ignored: every real takes part in every family's numbers.
    """
    y, s = _as_arrays(labels, scores)
    names = np.asarray([str(f) if f is not None else "" for f in families], dtype=object)
    if names.size != y.size:
        raise MasmError(f"families and labels differ in length: {names.size} families, {y.size} labels")
    keys = [str(v) for v in videos]
    result: dict[str, dict] = {}
    for family in sorted({str(f) for f in names[y == 1] if f}):
        rows = np.flatnonzero((y == 0) | ((y == 1) & (names == family)))
        _, v_labels, v_scores = video_scores([keys[i] for i in rows], y[rows], s[rows])
        result[family] = {
            "frame": binary_metrics(y[rows], s[rows], threshold, unit="frames"),
            "video": binary_metrics(v_labels, v_scores, threshold, unit="videos"),
        }
    return result


def evaluate_scores(
    paths: Sequence[str],
    videos: Sequence[str],
    labels: Any,
    scores: Any,
    skipped: Any = None,
    threshold: float = 0.5,
    families: Sequence[str | None] | None = None,
) -> dict:
    """Frame- and video-level metrics of one test set.

    Returns ``{"frame": binary_metrics(frames), "video": binary_metrics(videos) + {"n_videos",
    "n_videos_real", "n_videos_fake"}, "skipped": summarize_skipped(skipped)}``. Video scores are mean frame
    scores per video key (see :func:`video_scores`). With ``families`` (one per frame) whose fakes carry
    a family, also ``"families": family_metrics(...)``: each family's fakes against all reals.
    """
    skipped_summary = summarize_skipped(skipped)
    n_scores = np.size(scores)
    lengths = {"paths": len(paths), "videos": len(videos), "labels": np.size(labels), "scores": n_scores}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{n} {name}" for name, n in lengths.items())
        raise MasmError(f"paths, videos, labels and scores must have one entry per frame; got {listed}")
    if n_scores == 0:
        reasons = ", ".join(f"{r}: {c}" for r, c in skipped_summary["reasons"].items()) or "none given"
        raise MasmError(f"no frames were scored ({skipped_summary['count']} skipped; reasons: {reasons})")
    frame = binary_metrics(labels, scores, threshold, unit="frames")
    _, v_labels, v_scores = video_scores(videos, labels, scores)
    video = binary_metrics(v_labels, v_scores, threshold, unit="videos")
    video.update(n_videos=video["n"], n_videos_real=video["n_real"], n_videos_fake=video["n_fake"])
    result = {"frame": frame, "video": video, "skipped": skipped_summary}
    if families is not None:
        if len(families) != n_scores:
            raise MasmError(f"families must have one entry per frame; got {len(families)} for {n_scores}")
        per_family = family_metrics(videos, labels, scores, families, threshold)
        if per_family:
            result["families"] = per_family
    return result


def mean_over_datasets(reports: Mapping[str, Mapping]) -> dict:
    """Mean of frame and video AUC/AP/EER/ACC over the datasets' :func:`evaluate_scores` reports.

    Returns ``{"n_datasets", "datasets": [names], "frame": {metric: mean or None, "n_contributing":
    {metric: count}}, "video": {...}}``. ``None`` values (one-class test sets) are left out of a mean and
    out of its count; a mean with no contributors is ``None``.
    """
    result: dict[str, Any] = {"n_datasets": len(reports), "datasets": list(reports)}
    for level in ("frame", "video"):
        means: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for metric in MEAN_METRICS:
            values = [
                float(r[level][metric]) for r in reports.values() if r.get(level, {}).get(metric) is not None
            ]
            means[metric] = float(np.mean(values)) if values else None
            counts[metric] = len(values)
        means["n_contributing"] = counts
        result[level] = means
    return result

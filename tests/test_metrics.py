"""Metrics against scikit-learn and hand-built examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from masm.errors import MasmError
from masm.evaluation.metrics import (
    binary_metrics,
    evaluate_scores,
    mean_over_datasets,
    roc_points,
    summarize_skipped,
    video_scores,
)


def _eer_by_bisection(labels, scores) -> float:
    """EER from sklearn's ROC curve: the root of FNR(x) - x, with TPR linearly interpolated over FPR."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        # at a vertical ROC segment np.interp picks one end; bisection still closes in on the jump
        if 1.0 - np.interp(mid, fpr, tpr) - mid > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _cases():
    rng = np.random.default_rng(0)
    cases = {}
    for i, n in enumerate((7, 50, 333)):
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)
        cases[f"random-{n}"] = (labels, rng.random(n))
        cases[f"random-shifted-{n}"] = (labels, rng.normal(size=n) + labels * (i + 0.5))
    labels = rng.integers(0, 2, 200)
    labels[:2] = (0, 1)
    cases["tied-5-levels"] = (labels, rng.integers(0, 5, 200) / 4.0)
    cases["tied-shifted"] = (labels, np.round(rng.random(200) * 0.6 + labels * 0.4, 1))
    cases["all-tied"] = (labels, np.full(200, 0.5))
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 0])
    cases["separated"] = (labels, labels * 0.8 + 0.1)
    cases["inverted"] = (labels, 0.9 - labels * 0.8)
    cases["imbalanced"] = (np.r_[np.zeros(3, int), np.ones(40, int)], rng.random(43))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_sklearn(name):
    labels, scores = CASES[name]
    m = binary_metrics(labels, scores)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["eer"] == pytest.approx(_eer_by_bisection(labels, scores), abs=1e-9)
    assert m["acc"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    assert (m["n"], m["n_real"], m["n_fake"]) == (len(labels), int(np.sum(labels == 0)), int(np.sum(labels)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_roc_points_match_sklearn(name):
    labels, scores = CASES[name]
    fpr, tpr, thresholds = roc_points(labels, scores)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])


def test_extremes():
    labels = CASES["separated"][0]
    separated = binary_metrics(labels, CASES["separated"][1])
    assert (separated["auc"], separated["ap"], separated["eer"], separated["acc"]) == (1.0, 1.0, 0.0, 1.0)
    inverted = binary_metrics(labels, CASES["inverted"][1])
    assert (inverted["auc"], inverted["eer"], inverted["acc"]) == (0.0, 1.0, 0.0)
    tied = binary_metrics(*CASES["all-tied"])
    assert tied["auc"] == 0.5 and tied["eer"] == pytest.approx(0.5)


def test_eer_interpolates_between_roc_points():
    # ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1): FPR = FNR = 0.5 lies on the horizontal segment
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.7, 0.5, 0.3]
    assert binary_metrics(labels, scores)["eer"] == pytest.approx(0.5)
    # one tie between a real and a fake: diagonal segment from (0, .5) to (.5, 1), crossing at .25
    assert binary_metrics([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])["eer"] == pytest.approx(0.25)


def test_per_class_accuracy_independent_of_order():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4])
    m = binary_metrics(labels, scores)
    assert m["acc_real"] == pytest.approx(3 / 4)
    assert m["acc_fake"] == pytest.approx(1 / 2)
    assert m["acc"] == pytest.approx(4 / 6)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(len(labels))
        shuffled = binary_metrics(labels[perm], scores[perm])
        for key in ("auc", "ap", "eer", "acc", "acc_real", "acc_fake"):
            assert shuffled[key] == pytest.approx(m[key], abs=1e-12)


def test_threshold_is_inclusive():
    assert binary_metrics([0, 1], [0.2, 0.5])["acc"] == 1.0
    assert binary_metrics([0, 1], [0.2, 0.5], threshold=0.6)["acc_fake"] == 0.0


@pytest.mark.parametrize(("label", "only"), [(0, "real"), (1, "fake")])
def test_one_class_gives_none_and_note(label, only):
    m = binary_metrics([label] * 3, [0.2, 0.7, 0.4])
    assert m["auc"] is None and m["ap"] is None and m["eer"] is None
    assert m["note"] == f"only {only} samples (n=3): AUC undefined"
    assert m["acc"] == pytest.approx(1 / 3 if label == 1 else 2 / 3)
    assert m[f"acc_{'fake' if label == 0 else 'real'}"] is None
    assert all(not (isinstance(v, float) and np.isnan(v)) for v in m.values())


def test_bad_input_is_a_clear_error():
    with pytest.raises(MasmError, match="empty"):
        binary_metrics([], [])
    with pytest.raises(MasmError, match="length"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(MasmError, match="0 \\(real\\) or 1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(MasmError, match="NaN"):
        binary_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(MasmError, match="both real and fake"):
        roc_points([1, 1], [0.1, 0.2])


def test_video_scores_average_frames_per_key():
    videos = ["ff/real/000", "ff/FF-DF/000_003", "ff/real/000", "ff/FF-F2F/000_003", "ff/FF-DF/000_003"]
    labels = [0, 1, 0, 1, 1]
    scores = [0.2, 0.9, 0.4, 0.6, 0.5]
    keys, v_labels, v_scores = video_scores(videos, labels, scores)
    assert keys == ["ff/real/000", "ff/FF-DF/000_003", "ff/FF-F2F/000_003"]
    assert v_labels.tolist() == [0, 1, 1]
    np.testing.assert_allclose(v_scores, [0.3, 0.7, 0.6])


def test_video_with_mixed_labels_is_named():
    with pytest.raises(MasmError, match="'clip-7'"):
        video_scores(["clip-1", "clip-7", "clip-7"], [0, 1, 0], [0.1, 0.2, 0.3])


def test_evaluate_scores_layout():
    videos = ["r/a", "r/a", "r/b", "f/c", "f/c", "f/d", "f/d"]
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.7, 0.2, 0.9, 0.3, 0.8, 0.6]
    paths = [f"{v}/{i}.png" for i, v in enumerate(videos)]
    skipped = [("r/x/0.png", "missing file"), ("r/x/1.png", "missing file"), ("f/y/0.png", "no face")]
    result = evaluate_scores(paths, videos, labels, scores, skipped=skipped)
    assert set(result) == {"frame", "video", "skipped"}
    assert result["frame"] == binary_metrics(labels, scores, unit="frames")
    video = result["video"]
    assert (video["n_videos"], video["n_videos_real"], video["n_videos_fake"]) == (4, 2, 2)
    # video scores: a 0.4, b 0.2, c 0.6, d 0.7 -> perfectly separated
    assert video["auc"] == 1.0 and video["acc"] == 1.0
    assert result["skipped"] == {
        "count": 3,
        "reasons": {"missing file": 2, "no face": 1},
        "examples": [{"path": p, "reason": r} for p, r in skipped],
    }


def test_evaluate_scores_one_class_and_errors():
    result = evaluate_scores(["a", "b"], ["v1", "v2"], [1, 1], [0.3, 0.8])
    assert result["video"]["auc"] is None
    assert result["video"]["note"] == "only fake videos (n=2): AUC undefined"
    assert result["skipped"] == {"count": 0, "reasons": {}, "examples": []}
    with pytest.raises(MasmError, match="one entry per frame"):
        evaluate_scores(["a"], ["v1", "v2"], [1, 1], [0.3, 0.8])
    with pytest.raises(MasmError, match="no frames were scored \\(2 skipped; reasons: unreadable: 2\\)"):
        evaluate_scores([], [], [], [], skipped={"a.png": "unreadable", "b.png": "unreadable"})


def test_summarize_skipped_accepts_dicts_and_caps_examples():
    entries = [{"path": f"{i}.png", "reason": "no face"} for i in range(9)]
    summary = summarize_skipped(entries)
    assert summary["count"] == 9 and summary["reasons"] == {"no face": 9}
    assert len(summary["examples"]) == 5
    assert summarize_skipped(summary) == summary
    with pytest.raises(MasmError, match="path, reason"):
        summarize_skipped(["lonely"])


def test_mean_over_datasets_ignores_none():
    both = evaluate_scores(["a", "b", "c"], ["1", "2", "3"], [0, 1, 1], [0.2, 0.9, 0.4])
    one_class = evaluate_scores(["a", "b"], ["1", "2"], [1, 1], [0.3, 0.8])
    mean = mean_over_datasets({"A": both, "B": one_class})
    assert mean["n_datasets"] == 2 and mean["datasets"] == ["A", "B"]
    assert mean["frame"]["auc"] == pytest.approx(both["frame"]["auc"])
    assert mean["frame"]["n_contributing"] == {"auc": 1, "ap": 1, "eer": 1, "acc": 2}
    assert mean["frame"]["acc"] == pytest.approx((both["frame"]["acc"] + one_class["frame"]["acc"]) / 2)
    assert mean["video"]["eer"] == pytest.approx(both["video"]["eer"])
    only_one_class = mean_over_datasets({"B": one_class})
    assert only_one_class["video"]["auc"] is None and only_one_class["video"]["n_contributing"]["auc"] == 0


def test_family_metrics_pit_each_family_against_all_reals():
    from masm.evaluation.metrics import family_metrics

    rng = np.random.default_rng(5)
    labels = np.array([0] * 6 + [1] * 6)
    scores = rng.random(12)
    videos = [f"v{i // 2}" for i in range(12)]
    families = [None] * 6 + ["a", "a", "b", "b", "b", "b"]
    result = family_metrics(videos, labels, scores, families)
    assert list(result) == ["a", "b"]
    for family, rows in (("a", list(range(8))), ("b", list(range(6)) + list(range(8, 12)))):
        assert result[family]["frame"]["auc"] == pytest.approx(roc_auc_score(labels[rows], scores[rows]))
        assert result[family]["video"]["n_fake"] == (1 if family == "a" else 2)
    assert family_metrics(videos, labels, scores, [None] * 12) == {}

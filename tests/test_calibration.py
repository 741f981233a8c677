"""Calibration and operating points: temperature scaling, ECE/Brier, TPR at FPR, stored thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_curve

from masm.errors import MasmError
from masm.evaluation.calibration import (
    choose_operating_point,
    expected_calibration_error,
    expit,
    fit_calibration,
    fit_temperature,
    rates_at,
    stored_point_rates,
    tpr_at_fpr,
)
from masm.models.calibration import Calibration, canonical_operating_point, resolve_decisions


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(0.0, 3.0, 200_000)
    labels = (rng.random(true_log_odds.size) < expit(true_log_odds)).astype(int)
    for temperature in (0.4, 2.5):
        assert fit_temperature(true_log_odds * temperature, labels) == pytest.approx(temperature, rel=0.02)


def test_ece_equals_hand_computed_values():
    # one sample per bin: the mean of |score - label|
    assert expected_calibration_error([0, 1, 1, 0], [0.1, 0.25, 0.9, 0.96]) == pytest.approx(
        (0.1 + 0.75 + 0.1 + 0.96) / 4
    )
    # two samples in one bin (0.30 and 0.31 -> bin 4 of 15): |0.305 - 0.5|
    assert expected_calibration_error([1, 0], [0.30, 0.31]) == pytest.approx(0.195)
    # a score of exactly 1 falls in the last bin, not past it
    assert expected_calibration_error([1, 1], [1.0, 0.99]) == pytest.approx(0.005)
    # perfectly calibrated bins have no error
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)


def test_brier_score_matches_scikit_learn():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 300), rng.random(300)
    from masm.evaluation.calibration import brier_score

    assert brier_score(labels, scores) == pytest.approx(brier_score_loss(labels, scores))


def _hundred_reals_ten_fakes():
    reals = np.arange(100) / 100.0  # 0.00 .. 0.99
    fakes = np.array([0.995, 0.985, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    return np.r_[np.zeros(100, int), np.ones(10, int)], np.r_[reals, fakes]


def test_tpr_at_fpr_by_hand_and_against_scikit_learn():
    labels, scores = _hundred_reals_ten_fakes()
    # 1 % of 100 reals: one false alarm allowed (0.99); the fakes above the second real (0.98) are found
    assert tpr_at_fpr(labels, scores, 0.01)["tpr"] == pytest.approx(0.2)
    fpr, tpr, _ = roc_curve(labels, scores)
    for target in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(labels, scores, target)["tpr"] == pytest.approx(tpr[fpr <= target + 1e-12].max())
    too_few = tpr_at_fpr(labels, scores, 0.001)
    assert too_few["tpr"] is None and "1000" in too_few["note"] and too_few["n_real"] == 100


def test_a_threshold_chosen_on_a_split_gives_the_stated_fpr_on_it():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(5000, int), np.ones(1000, int)]
    scores = np.r_[rng.beta(2, 5, 5000), rng.beta(5, 2, 1000)]
    for name, target in (("fpr=0.01", 0.01), ("fpr=0.001", 0.001)):
        op = choose_operating_point(labels, scores, name, data="val")
        here = rates_at(labels, scores, op.threshold)
        assert here["fpr"] == pytest.approx(op.fpr) and op.fpr <= target
        assert here["tpr"] == pytest.approx(op.tpr)
        # the lowest such threshold: the next real below it would break the target
        next_real = scores[(labels == 0) & (scores < op.threshold)].max()
        assert rates_at(labels, scores, next_real)["fpr"] > target
        assert (op.n_real, op.n_fake) == (5000, 1000)
        assert op.fpr_upper95 > op.fpr
    eer = choose_operating_point(labels, scores, "eer")
    assert abs(eer.fpr - (1 - eer.tpr)) < 0.01


def test_fit_calibration_and_its_errors():
    labels, scores = _hundred_reals_ten_fakes()
    log_odds = np.log(scores + 1e-3) - np.log1p(-scores + 1e-3)
    calibration, notes = fit_calibration(log_odds, labels, data="val")
    assert calibration.names() == ["eer", "fpr=0.01"]  # fpr=0.001 needs 1000 reals: skipped, said so
    assert calibration.default == "fpr=0.01"
    assert any("fpr=0.001" in n and "100 real" in n for n in notes)
    with pytest.raises(MasmError, match=r"val: 100 real frames, too few for operating point fpr=0.001"):
        fit_calibration(log_odds, labels, data="val", points=["fpr=0.001"])
    with pytest.raises(MasmError, match=r"val: only real frames \(100\)"):
        fit_calibration(log_odds[:100], labels[:100], data="val")
    # video level: the mean calibrated frame score of each video
    videos = [f"v{i // 2}" for i in range(labels.size)]
    with_videos, _ = fit_calibration(log_odds, labels, videos=videos, data="val", points=["eer"])
    assert {op.level for op in with_videos.operating_points} == {"frame", "video"}


def test_stored_points_report_their_drift_on_new_data():
    labels, scores = _hundred_reals_ten_fakes()
    calibration, _ = fit_calibration(np.log(scores + 1e-3) - np.log1p(-scores + 1e-3), labels, data="val")
    calibrated = expit((np.log(scores + 1e-3) - np.log1p(-scores + 1e-3)) / calibration.temperature)
    same = stored_point_rates(calibration, labels, calibrated)["fpr=0.01"]
    assert same["fpr_drift"] == pytest.approx(0.0) and same["chosen_on"]["data"] == "val"
    shifted = stored_point_rates(calibration, labels, np.minimum(calibrated + 0.2, 1.0))["fpr=0.01"]
    assert shifted["fpr"] > 0.01 and shifted["fpr_drift"] > 0


def test_decisions_follow_the_stored_point_and_say_when_none_is_stored():
    labels, scores = _hundred_reals_ten_fakes()
    calibration, _ = fit_calibration(np.log(scores + 1e-3) - np.log1p(-scores + 1e-3), labels, data="val")
    stored = Calibration.from_dict(calibration.to_dict())
    assert stored == calibration
    decisions = resolve_decisions(stored)
    assert decisions["frame"].name == "fpr=0.01"
    assert decisions["frame"].threshold == calibration.point("fpr=0.01").threshold
    assert "frame-level" in decisions["video"].note  # no video-level point in image data
    assert resolve_decisions(stored, "eer")["frame"].name == "eer"
    assert resolve_decisions(stored, threshold=0.7)["frame"].describe()["threshold"] == 0.7
    none = resolve_decisions(None)
    assert none["frame"].threshold == 0.5 and "no operating point stored" in none["frame"].note
    with pytest.raises(MasmError, match="fpr=0.05.*not stored.*eer, fpr=0.01"):
        resolve_decisions(stored, "fpr=0.05")
    with pytest.raises(MasmError, match="unknown operating point"):
        canonical_operating_point("fnr=0.1")

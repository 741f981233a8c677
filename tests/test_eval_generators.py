"""Per-generator numbers (each generator's reals against its fakes) against scikit-learn and by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from masm.evaluation.evaluate import metrics_for
from masm.evaluation.generators import generator_metrics, generators_block, has_generators
from masm.evaluation.report import write_eval_report
from masm.models.calibration import Calibration, OperatingPoint

# Two generators with their own reals; "solo" has fakes only (AUC undefined, left out of the means).
LABELS = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
SCORES = [0.1, 0.6, 0.3, 0.9, 0.4, 0.7, 0.5, 0.2, 0.8, 0.55, 0.65, 0.1, 0.9]
FAMILIES = ["adm"] * 7 + ["biggan"] * 4 + ["solo"] * 2


def test_per_generator_equals_sklearn_and_hand_counted_accuracies():
    result = generator_metrics(LABELS, SCORES, FAMILIES)
    per = result["per_generator"]
    assert list(per) == ["adm", "biggan", "solo"]
    y, s, f = np.array(LABELS), np.array(SCORES), np.array(FAMILIES)
    for name in ("adm", "biggan"):
        rows = f == name
        assert per[name]["auc"] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)
        assert per[name]["ap"] == pytest.approx(average_precision_score(y[rows], s[rows]), abs=1e-12)
    # adm: reals 0.1 0.6 0.3 -> 2 of 3 right; fakes 0.9 0.4 0.7 0.5 (>= 0.5 is fake) -> 3 of 4
    assert per["adm"]["acc_real"] == pytest.approx(2 / 3)
    assert per["adm"]["acc_fake"] == pytest.approx(3 / 4)
    assert per["adm"]["acc"] == pytest.approx(5 / 7)
    assert (per["adm"]["n_real"], per["adm"]["n_fake"]) == (3, 4)
    # biggan: reals 0.2 0.8 -> 1 of 2; fakes 0.55 0.65 -> 2 of 2
    assert (per["biggan"]["acc_real"], per["biggan"]["acc_fake"], per["biggan"]["acc"]) == (0.5, 1.0, 0.75)
    assert per["solo"]["auc"] is None and per["solo"]["ap"] is None and per["solo"]["acc_real"] is None
    assert per["solo"]["acc_fake"] == 0.5 and "only fake images" in per["solo"]["note"]
    mean = result["mean"]
    assert mean["n_generators"] == 3
    assert mean["auc"] == pytest.approx((per["adm"]["auc"] + per["biggan"]["auc"]) / 2)
    assert mean["acc"] == pytest.approx((5 / 7 + 0.75 + 0.5) / 3)
    assert mean["acc_real"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert mean["n_contributing"] == {"acc": 3, "acc_real": 2, "acc_fake": 3, "ap": 2, "auc": 2}


def test_stored_operating_point_thresholds_the_calibrated_score():
    log_odds = np.array([-2.0, 1.0, 3.0, 5.0, -1.0, 0.5])
    raw = 1 / (1 + np.exp(-log_odds))
    labels, families = [0, 0, 0, 1, 1, 1], ["g"] * 6
    point = OperatingPoint("fpr=0.01", "frame", threshold=0.7, fpr=0.0, tpr=0.5, n_real=3, n_fake=3)
    calibration = Calibration(temperature=2.0, operating_points=[point], default="fpr=0.01")
    block = generators_block(labels, raw, families, log_odds, calibration)
    assert block["decision"] == {"name": "fpr=0.01", "threshold": 0.7, "score": "calibrated"}
    # calibrated sigmoid(z / 2): reals 0.269 0.622 0.818 -> 2 of 3 below 0.7; fakes 0.924 0.378 0.562: 1
    entry = block["per_generator"]["g"]
    assert (entry["acc_real"], entry["acc_fake"], entry["acc"]) == pytest.approx((2 / 3, 1 / 3, 0.5))
    assert entry["auc"] == pytest.approx(roc_auc_score(labels, raw))
    plain = generators_block(labels, raw, families, log_odds, Calibration(temperature=2.0))
    assert plain["decision"] == {"name": "threshold=0.5", "threshold": 0.5, "score": "raw"}
    assert plain["per_generator"]["g"]["acc_real"] == pytest.approx(1 / 3)  # 0.73 and 0.95 >= 0.5


def test_only_frames_that_all_name_generators_get_the_block():
    assert has_generators([0, 1], ["a", "a"])
    assert not has_generators([0, 1], [None, "a"])  # face data: reals carry no family
    assert not has_generators([1, 1], ["a", "b"])  # no reals at all
    face = [SimpleNamespace(path=f"{i}.png", video=f"v{i}", label=y, family=None if y == 0 else "FF-DF")
            for i, y in enumerate([0, 0, 1, 1])]  # fmt: skip
    result, _ = metrics_for(face, np.array([0.1, 0.6, 0.7, 0.2]), [])
    assert "generators" not in result and "families" in result


def test_report_json_and_md_carry_the_generators(tmp_path):
    records = [
        SimpleNamespace(path=f"{i}.png", video=f"{i}.png", label=y, family=f)
        for i, (y, f) in enumerate(zip(LABELS, FAMILIES))
    ]
    scores = np.array(SCORES + [np.nan])  # one frame failed to load: left out of every number
    records.append(SimpleNamespace(path="bad.png", video="bad.png", label=0, family="adm"))
    result, rows = metrics_for(
        records, scores, [("bad.png", "corrupt")], log_odds=np.log(scores / (1 - scores))
    )
    assert result["generators"]["per_generator"]["adm"]["n_real"] == 3
    write_eval_report(tmp_path, {"GenImage": result}, {"GenImage": rows}, {"seed": 0})
    report = json.loads((tmp_path / "report.json").read_text())
    block = report["datasets"]["GenImage"]["generators"]
    assert block["per_generator"]["biggan"]["acc"] == 0.75 and block["mean"]["n_generators"] == 3
    assert block["decision"]["name"] == "threshold=0.5"
    md = (tmp_path / "report.md").read_text()
    assert "## Per generator" in md and "| biggan | 0.7500 | 0.5000 | 1.0000 |" in md
    assert "| mean over 3 generators |" in md

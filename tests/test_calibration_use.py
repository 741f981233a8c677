"""Calibration where decisions are made (issue 28): ``masm calibrate`` stores it without touching the
weights; ``masm detect``, ``masm serve`` and the ONNX export agree on the calibrated score and the label;
an old checkpoint loads and decides at 0.5 with a note; bad calibration data is a one-line error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from masm.cli.main import main
from masm.models import load_checkpoint, save_checkpoint
from test_export import trained_tiny

N_REAL, N_FAKE = 120, 40


def _write_images(folder, n, smooth, rng):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        if smooth:
            image = cv2.GaussianBlur(image, (0, 0), 3)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A checkpoint before and after ``masm calibrate`` on a folder of smooth reals and noisy fakes."""
    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    reals = _write_images(root / "data" / "real", N_REAL, True, rng)
    fakes = _write_images(root / "data" / "fake" / "noise", N_FAKE, False, rng)
    old = save_checkpoint(trained_tiny(), root / "old")
    new = root / "new"
    shutil.copytree(old, new)
    code = main(["calibrate", str(new), "--data", f"folder:{root / 'data'}", "--out", str(root / "report")])
    assert code == 0
    return {"root": root, "old": old, "new": new, "images": reals[:6] + fakes[:6], "report": root / "report"}


def _detect(checkpoint, paths, tmp_path, *extra):
    out = tmp_path / "detect.jsonl"
    code = main(["detect", str(checkpoint), *map(str, paths), "--no-face", "--out", str(out), *extra])
    assert code == 0
    return {r["input"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_calibrate_stores_its_record_and_leaves_the_weights(calibrated):
    old, new = calibrated["old"], calibrated["new"]
    assert (old / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    config = json.loads((new / "config.json").read_text())
    stored = config["calibration"]
    assert stored["fitted_on"] == "data" and (stored["n_real"], stored["n_fake"]) == (N_REAL, N_FAKE)
    names = {op["name"] for op in stored["operating_points"]}
    assert names == {"fpr=0.01", "eer"}  # fpr=0.001 needs 1,000 reals: skipped, with a note
    notes = json.loads((calibrated["report"] / "calibration.json").read_text())["notes"]
    assert any("fpr=0.001" in note and "120 real" in note for note in notes)
    for name in ("calibration.md", "reliability.png", "roc-log.png"):
        assert (calibrated["report"] / name).is_file()
    # the temperature really changes the scores here (not a no-op fit)
    assert abs(np.log(stored["temperature"])) > 0.05
    assert load_checkpoint(new).calibration.temperature == stored["temperature"]
    assert load_checkpoint(old).calibration is None  # a checkpoint written before loads as before


def test_detect_serve_and_onnx_agree_on_the_calibrated_score_and_the_label(calibrated, tmp_path):
    """At the EER point (a threshold with images on both sides here); the default point is checked too."""
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from masm.inference.export import export_onnx, onnx_scores
    from masm.serve import ServeOptions, create_app

    new, paths = calibrated["new"], calibrated["images"]
    detector = load_checkpoint(new)
    default = _detect(new, paths[:1], tmp_path)[str(paths[0])]
    threshold = detector.calibration.point("fpr=0.01").threshold
    assert default["operating_point"] == {"name": "fpr=0.01", "threshold": threshold, "level": "frame"}
    point = detector.calibration.point("eer")
    detect = _detect(new, paths, tmp_path, "--operating-point", "eer")
    for path in paths:
        r = detect[str(path)]
        assert r["operating_point"] == {"name": "eer", "threshold": point.threshold, "level": "frame"}
        assert r["label"] == ("fake" if r["score"] >= point.threshold else "real")
        # the calibrated score is sigmoid(log-odds / T) of the raw one
        log_odds = np.log(r["raw_score"]) - np.log1p(-r["raw_score"])
        assert r["score"] == pytest.approx(
            1 / (1 + np.exp(-log_odds / detector.calibration.temperature)), abs=1e-9
        )
    assert {r["label"] for r in detect.values()} == {"real", "fake"}  # both sides of the threshold

    exported = export_onnx(new, tmp_path / "detector.onnx")
    assert exported["max_abs_diff"] <= 1e-4
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    onnx_score = onnx_scores(tmp_path / "detector.onnx", images)
    onnx_raw = onnx_scores(tmp_path / "detector.onnx", images, output="raw_score")
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "detector.onnx")).metadata_props}
    contract = json.loads(metadata["masm.input_contract"])
    thresholds = {
        op["name"]: op["threshold"]
        for op in contract["calibration"]["operating_points"]
        if op["level"] == "frame"
    }
    assert thresholds["eer"] == point.threshold and contract["calibration"]["default"] == "fpr=0.01"

    with TestClient(create_app(new, ServeOptions(faces=False, operating_point="eer"))) as client:
        info = client.get("/v1/model").json()
        assert info["operating_point"]["frame"]["name"] == "eer"
        for path, score, raw in zip(paths, onnx_score, onnx_raw):
            r = detect[str(path)]
            assert abs(score - r["score"]) <= 1e-4 and abs(raw - r["raw_score"]) <= 1e-4
            assert ("fake" if score >= thresholds["eer"] else "real") == r["label"]
            answer = client.post("/v1/detect", files={"file": (path.name, path.read_bytes())}).json()
            assert abs(answer["score"] - r["score"]) <= 1e-4 and answer["label"] == r["label"]
            assert answer["operating_point"] == r["operating_point"]


def test_other_operating_points_and_thresholds_and_the_uncalibrated_default(calibrated, tmp_path, capsys):
    new, old, paths = calibrated["new"], calibrated["old"], calibrated["images"][:3]
    eer = _detect(new, paths, tmp_path, "--operating-point", "eer")
    assert {r["operating_point"]["name"] for r in eer.values()} == {"eer"}
    fixed = _detect(new, paths, tmp_path, "--threshold", "0.25")
    assert {r["operating_point"]["name"] for r in fixed.values()} == {"threshold=0.25"}
    capsys.readouterr()
    plain = _detect(old, paths, tmp_path)
    assert all(
        r["operating_point"]["threshold"] == 0.5 and r["score"] == r["raw_score"] for r in plain.values()
    )
    assert "no operating point stored" in capsys.readouterr().err
    assert main(["detect", str(old), str(paths[0]), "--no-face", "--operating-point", "fpr=0.01"]) == 2
    assert "not stored with this detector (stored: none)" in capsys.readouterr().err


def test_bad_calibration_data_is_a_one_line_error(calibrated, tmp_path, capsys):
    root, old = calibrated["root"], calibrated["old"]
    one_class = tmp_path / "reals-only"
    shutil.copytree(root / "data" / "real", one_class / "real")
    (one_class / "fake").mkdir()
    target = tmp_path / "ckpt"
    shutil.copytree(old, target)
    assert (
        main(["calibrate", str(target), "--data", f"folder:{one_class}", "--out", str(tmp_path / "r1")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reals-only: only real frames (120)" in err
    code = main(
        [
            "calibrate",
            str(target),
            "--data",
            f"folder:{root / 'data'}",
            "--point",
            "fpr=0.001",
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data: 120 real frames, too few for operating point fpr=0.001 (needs at least 1000)" in err
    assert load_checkpoint(target).calibration is None  # nothing was stored

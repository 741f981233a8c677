"""`masm eval` / evaluate_checkpoint: reports equal scikit-learn on the saved predictions; bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
from collections import defaultdict

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from masm.evaluation.evaluate import evaluate_checkpoint
from masm.training import load_train_config, train
from test_train_support import TINY_CONFIG, cli_command, make_folder_dataset, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_folder_dataset(root / "fx")
    other = make_folder_dataset(root / "other", n_real=4, n_fake=5, seed=1)
    config = load_train_config(TINY_CONFIG, tiny_overrides(data, max_steps=2, **{"data.val": "none"}))
    result = train(config, root / "run", progress=False)
    return {"root": root, "data": data, "other": other, "ckpt": result.best_checkpoint}


def _cli(argv, monkeypatch, capsys):
    code = run_cli(argv, monkeypatch)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_report_metrics_equal_sklearn_on_predictions_csv(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    argv = [
        "eval",
        str(trained["ckpt"]),
        "--data",
        f"folder:{trained['data']}",
        "--data",
        f"folder:{trained['other']}",
        "--frames",
        "4",
        "--workers",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    code, captured = _cli(argv, monkeypatch, capsys)
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "roc.png", "predictions.csv"):
        assert (out / name).is_file()
    rows = defaultdict(list)
    with (out / "predictions.csv").open() as fh:
        for row in csv.DictReader(fh):
            rows[row["dataset"]].append((row["video"], int(row["label"]), float(row["score"])))
    assert set(rows) == set(report["datasets"]) == {"fx", "other"}
    for name, entries in rows.items():
        videos, labels, scores = zip(*entries)
        frame = report["datasets"][name]["frame"]
        assert frame["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert frame["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert frame["acc"] == pytest.approx(accuracy_score(labels, np.asarray(scores) >= 0.5))
        assert (frame["n_real"], frame["n_fake"]) == (labels.count(0), labels.count(1))
        per_video = defaultdict(list)
        for v, y, s in entries:
            per_video[v].append((y, s))
        v_labels = [items[0][0] for items in per_video.values()]
        v_scores = [np.mean([s for _, s in items]) for items in per_video.values()]
        assert report["datasets"][name]["video"]["auc"] == pytest.approx(roc_auc_score(v_labels, v_scores))
    mean_auc = np.mean([report["datasets"][n]["frame"]["auc"] for n in rows])
    assert report["mean"]["frame"]["auc"] == pytest.approx(mean_auc)

    # Per family: that family's fakes against all reals, beside the pooled AUC in the terminal table.
    paths = defaultdict(list)
    with (out / "predictions.csv").open() as fh:
        for row in csv.DictReader(fh):
            paths[row["dataset"]].append((row["path"], int(row["label"]), float(row["score"])))
    for name in rows:
        families = report["datasets"][name]["families"]
        assert set(families) == {"fam1", "fam2"}
        for family, result in families.items():
            kept = [(y, s) for p, y, s in paths[name] if y == 0 or f"/fake/{family}/" in p]
            labels, scores = zip(*kept)
            assert result["frame"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
            assert result["frame"]["n_fake"] == sum(labels) < report["datasets"][name]["frame"]["n_fake"]
            line = next(x for x in captured.out.splitlines() if f"| {name} / {family} |" in x)
            assert f"| {result['frame']['auc']:.4f} |" in line
    mean_line = next(x for x in captured.out.splitlines() if x.startswith("| mean"))
    assert mean_line.startswith("| mean (AUC over 2 of 2) |") and f"{mean_auc:.4f}" in mean_line
    assert "n/a" not in mean_line  # the counts are not averaged: their cells stay empty
    assert "fx / fam1" in (out / "report.md").read_text()
    meta = report["meta"]
    assert (
        meta["seed"] == 0 and meta["parity"] is False and meta["config"]["model"]["backbone"] == "tiny-clip"
    )
    assert meta["config"]["train"]["seed"] == 0


def test_robustness_sweep_and_parity_label(trained, tmp_path):
    result = evaluate_checkpoint(
        trained["ckpt"],
        [f"folder:{trained['data']}"],
        out_dir=tmp_path / "rob",
        frames=4,
        perturbations=[("jpeg", 1), ("blur", 2), ("blur", 5)],
        parity=True,
        progress=False,
    )
    table = json.loads((tmp_path / "rob" / "robustness.json").read_text())["table"]
    assert set(table) == {"jpeg", "blur"} and set(table["blur"]) == {"0", "2", "5"}
    assert table["blur"]["0"]["fx"] == pytest.approx(result["datasets"]["fx"]["frame"]["auc"])
    assert "parity mode" in (tmp_path / "rob" / "report.md").read_text()
    assert result["meta"]["parity"] is True and result["meta"]["frame_sampling"].startswith("first-N")


def test_perturb_all_expands_to_every_perturbation_and_level():
    from masm.data.perturb import LEVELS, PERTURBATIONS, parse_perturbation

    assert len(parse_perturbation("all")) == len(PERTURBATIONS) * len(LEVELS)


def test_missing_dataset_subprocess_exit_code_and_one_line(trained, tmp_path):
    argv = cli_command(tmp_path) + [
        "eval",
        str(trained["ckpt"]),
        "--data",
        "folder:/nonexistent/ds",
        "--out",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "dataset folder not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_one_class_test_set_warns_and_fails(trained, tmp_path, monkeypatch, capsys):
    only_real = make_folder_dataset(tmp_path / "realonly", n_real=3, only_real=True)
    argv = [
        "eval",
        str(trained["ckpt"]),
        "--data",
        f"folder:{only_real}",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    code, captured = _cli(argv, monkeypatch, capsys)
    assert code == 1
    assert "only real frames" in captured.err and "AUC undefined" in captured.err


def test_empty_test_set(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty" / "real").mkdir(parents=True)
    (tmp_path / "empty" / "real" / "notes.txt").write_text("no images here")
    argv = [
        "eval",
        str(trained["ckpt"]),
        "--data",
        f"folder:{tmp_path / 'empty'}",
        "--out",
        str(tmp_path / "r"),
    ]
    code, captured = _cli(argv, monkeypatch, capsys)
    assert code == 2 and "no frames loaded" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_checkpoint_of_another_backbone(trained, tmp_path, monkeypatch, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["backbone_fingerprint"] = "0" * 16  # trained on other weights than tiny-clip's
    (ckpt / "config.json").write_text(json.dumps(config))
    argv = ["eval", str(ckpt), "--data", f"folder:{trained['data']}", "--out", str(tmp_path / "r")]
    code, captured = _cli(argv, monkeypatch, capsys)
    assert code == 2 and "fingerprint mismatch" in captured.err


def test_missing_checkpoint_and_bad_perturbation(trained, tmp_path, monkeypatch, capsys):
    code, captured = _cli(["eval", str(tmp_path / "nope"), "--data", "folder:x"], monkeypatch, capsys)
    assert code == 2 and "checkpoint directory not found" in captured.err
    argv = ["eval", str(trained["ckpt"]), "--data", f"folder:{trained['data']}", "--perturb", "sepia:2"]
    code, captured = _cli(argv, monkeypatch, capsys)
    assert code == 2 and "unknown perturbation 'sepia'" in captured.err

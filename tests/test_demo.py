"""``masm demo`` (a lighter variant of --quick) and ``masm bench quality`` end to end (issue 6)."""

from __future__ import annotations

import json

import pytest

from masm.cli.main import main
from masm.models import load_checkpoint


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_its_outputs_load(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--quick",
        "--steps",
        "12",
        "--train-reals",
        "40",
        "--eval-per-family",
        "8",
        "--baseline",
        "effort",
    ]
    code = main([*argv, "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for method in ("masm", "effort"):
        for key in ("indist_auc", "heldout_auc", "unseen_auc"):
            assert 0.0 <= report["methods"][method][key] <= 1.0
    assert report["heldout_families"] and not set(report["heldout_families"]) & set(report["train_families"])
    assert (out / "report.md").read_text().startswith("# masm demo")
    assert (out / "roc.png").stat().st_size > 0 and (out / "masks.png").stat().st_size > 0
    assert (out / "examples.png").stat().st_size > 0 and "examples.png" in (out / "report.md").read_text()
    detector = load_checkpoint(out / "model")
    assert detector.config.method.name == "masm" and detector.config.backbone == "demo-clip"
    assert detector.preprocessing.face_crop is None and detector.preprocessing.input_size == 64
    image = next((out / "data" / "unseen" / "real").glob("*.png"))
    assert (
        main(["detect", str(out / "model"), str(image), "--no-face", "--out", str(tmp_path / "d.jsonl")]) == 0
    )
    assert json.loads((tmp_path / "d.jsonl").read_text())["error"] is None


@pytest.mark.slow
def test_quality_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "q"
    argv = ["bench", "quality", "--out", str(out / "quality.json"), "--work", str(out), "--seeds", "2"]
    argv += ["--steps", "4"]
    argv += ["--train-reals", "24", "--eval-per-family", "6"]
    assert main([*argv, "--methods", "masm,linear", "--no-ablations", "--jobs", "2"]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert set(result["summary"]) == {"masm", "linear"} and result["summary"]["masm"]["n"] == 2
    # two worker processes, results in plan order whatever order they finished in
    assert [(r["label"], r["seed"]) for r in result["runs"]] == [
        ("masm", 0),
        ("masm", 1),
        ("linear", 0),
        ("linear", 1),
    ]
    assert "held-out AUC" in (out / "quality.md").read_text()
    # The head-only baseline leaves the pretrained attention weights exactly as they were; MASM moves them.
    assert result["summary"]["linear"]["attn_weight_change"] == 0.0
    assert result["summary"]["masm"]["attn_weight_change"] > 0.0
    assert "attention ΔW/W" in (out / "quality.md").read_text()


def test_attention_weight_change_is_the_relative_frobenius_distance():
    import math

    import torch

    from masm.demo.experiment import attention_weight_change
    from masm.method.apply import find_targets
    from masm.method.config import ATTENTION_TARGETS
    from masm.models.factory import load_backbone

    model = load_backbone("tiny-clip")
    assert attention_weight_change(model, "tiny-clip") == 0.0
    targets = find_targets(model, ATTENTION_TARGETS)
    energy = sum(linear.weight.pow(2).sum().item() for _, linear in targets)
    with torch.no_grad():
        targets[0][1].weight.add_(0.5)
    expected = math.sqrt(0.25 * targets[0][1].weight.numel() / energy)
    assert attention_weight_change(model, "tiny-clip") == pytest.approx(expected, rel=1e-5)


def test_demo_rejects_an_unknown_baseline(capsys):
    assert main(["demo", "--baseline", "nope"]) == 2
    assert "--baseline must be one of" in capsys.readouterr().err


def test_quality_benchmark_defaults_are_the_demos_settings():
    from masm.benchmarks.quality import LR, STRENGTH, TRAIN_FAMILIES
    from masm.demo.experiment import DEFAULT_TRAIN_FAMILIES, DEMO_STRENGTH, RunSettings

    assert TRAIN_FAMILIES.split(",") == list(DEFAULT_TRAIN_FAMILIES)
    assert STRENGTH == DEMO_STRENGTH and LR == RunSettings().lr

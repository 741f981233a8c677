"""``make gpu-check``'s script, its CPU part: bf16 vs fp32 steps, torchrun (gloo) through the test
evaluation, and the speed benchmark, all on the tiny backbone; and a failure exits non-zero."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from test_train_support import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_part_runs_every_check_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "report.json"
    argv = [
        "--device",
        "cpu",
        "--out",
        str(out),
        "--steps",
        "2",
        "--speed-methods",
        "masm,frozen-floor",
        "--speed-steps",
        "1",
    ]
    assert _gpu_check().main(argv) == 0
    report = json.loads(out.read_text())
    assert (
        report["ok"]
        and report["within_budget"]
        and list(report["checks"]) == ["precision", "graph", "torchrun", "speed"]
    )
    graph = report["checks"]["graph"]
    assert graph["graph"]["steps"] == 32 and graph["graph"]["max_weight_diff"] <= 1e-4
    for method in ("masm", "effort"):
        result = report["checks"]["precision"]["methods"][method]
        assert result["ok"] and result["bf16"]["logits_dtype"] == "torch.bfloat16"
        assert 0 < result["grad_rel_err"] <= 0.1 and len(result["fp32"]["losses"]) == 2
    torchrun = report["checks"]["torchrun"]
    assert (
        torchrun["processes"] == 1 and torchrun["test_frame_auc"] is not None and torchrun["train_steps"] >= 1
    )
    speed = report["checks"]["speed"]["runs"]["tiny-clip/eager"]
    assert speed["step_ms"]["masm"] > 0 and "merged_vs_plain_infer" in speed["ratios"]
    assert (
        speed["ratios"]["masm_syncs_per_step"] == 0 and "masm_vs_floor_step" in speed["issue17_targets_met"]
    )


def test_a_failed_check_exits_non_zero(tmp_path):
    out = tmp_path / "report.json"
    # no tolerance at all: bf16 cannot match fp32 exactly
    argv = ["--device", "cpu", "--out", str(out), "--only", "precision", "--grad-tol", "0", "--steps", "1"]
    assert _gpu_check().main(argv) == 1
    report = json.loads(out.read_text())
    assert (
        not report["ok"]
        and "first-step gradients differ" in report["checks"]["precision"]["methods"]["masm"]["error"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_check_without_cuda_says_so(tmp_path):
    out = tmp_path / "report.json"
    assert _gpu_check().main(["--device", "cuda", "--out", str(out)]) == 1
    assert "CUDA is not available" in json.loads(out.read_text())["checks"]["cuda"]["error"]

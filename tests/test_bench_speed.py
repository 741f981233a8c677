"""``masm bench speed`` end to end on a tiny backbone: every method runs, the ratios the issue names exist."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from masm.benchmarks import speed


def test_speed_benchmark_reports_every_ratio_and_the_floor(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    out = tmp_path / "speed.json"
    args = parser.parse_args(
        [
            "--backbone",
            "tiny-clip",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--methods",
            "masm,fmsd,effort-reference,full,frozen-floor,masm-path-only",
            "--out",
            str(out),
        ]
    )
    assert speed.run(args) == 0
    results = json.loads(out.read_text())
    for key in (
        "masm_vs_effort_step",
        "masm_vs_full_step",
        "merged_vs_plain_infer",
        "masm_vs_full_peak_mem",
        "floor_vs_effort_step",
        "masm_vs_floor_step",
        "path_only_vs_floor_step",
        "path_only_vs_effort_step",
        "masm_vs_floor_ops",
        "masm_vs_floor_flops",
        "fmsd_vs_masm_step",
    ):
        assert math.isfinite(results["ratios"][key]) and results["ratios"][key] > 0, key
    assert results["ratios"]["masm_syncs_per_step"] == 0
    assert results["train"]["masm"]["mask"]["paused_subspaces"] > 0  # timed with the mask active
    assert set(results["targets_met"]) == {
        "masm_vs_floor_ops",
        "masm_syncs_per_step",
        "masm_vs_floor_step",
        "masm_vs_effort_step",
        "masm_vs_full_step",
        "merged_vs_plain_infer",
        "masm_vs_full_peak_mem",
    }
    assert all(len(r["step_times_s"]) == 1 for r in results["train"].values())
    # one round: each ratio is the ratio of that round's two steps
    train = results["train"]
    assert results["ratios"]["masm_vs_floor_step"] == pytest.approx(
        train["masm"]["step_times_s"][0] / train["frozen-floor"]["step_times_s"][0]
    )
    # The floor trains only the targeted Linears' biases (4 per layer x 4 layers x 64) and the 2-way head.
    assert results["train"]["frozen-floor"]["trainable"] == 4 * 4 * 64 + (64 * 2 + 2)
    # The bare path has MASM's trainable parameters exactly.
    assert results["train"]["masm-path-only"]["trainable"] == results["train"]["masm"]["trainable"]
    assert all(r["ops_per_step"] > 0 for r in results["train"].values())
    assert "floor_vs_effort_step" in capsys.readouterr().out


def test_masm_step_dispatches_few_operations_per_adapted_layer_and_never_waits_for_the_device():
    """On a GPU with small batches a step costs about its number of dispatched operations (measured on an
    H100: ~20 µs each). A group's layers share one tensor per factor, so the optimizer, the guard, the
    regularisers and the mask take a fixed number of operations per group; looping over layers or
    subspaces again (a per-layer stack of the factors alone added ~9 per layer) fails here (measured at
    this code: 274 more than the floor's 453). The step runs
    with the mask active (:func:`steady_mask`) and must not read anything on the host."""
    import torch

    settings = speed.SpeedSettings(backbone="tiny-clip", batch_size=2)
    counts = {}
    for method in ("masm", "frozen-floor"):
        step = speed._TrainingStep(method, settings, torch.device("cpu"))
        step()  # Adam's state exists from the first step on
        counts[method] = speed.count_dispatched_ops(step)
        if method == "masm":
            paused = step.mask_state
            assert paused["wholly_paused_layers"] > 0 and paused["partly_paused_layers"] > 0, paused
    layers = 4 * 4  # tiny-clip: 4 blocks x (q, k, v, out)
    (masm_ops, masm_syncs), (floor_ops, _) = counts["masm"], counts["frozen-floor"]
    assert masm_syncs == 0, counts
    # ~250 per step whatever the depth (regularisers, guard, mask, operands: per group), a few per layer
    assert masm_ops - floor_ops <= 6 * layers + 250, counts


def test_host_syncs_are_counted():
    import torch

    x = torch.ones(3)
    assert speed.count_dispatched_ops(lambda: (x * 2).sum().item()) == (3, 1)
    assert speed.count_dispatched_ops(lambda: bool((x > 0).any()))[1] == 1
    assert speed.count_dispatched_ops(lambda: x.nonzero())[1] == 1


def test_unknown_method_is_one_clear_error():
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(["--methods", "masm,bogus"])
    with pytest.raises(Exception, match="unknown method 'bogus'"):
        speed.run(args)


def test_the_low_rank_path_adds_only_its_thin_products_to_the_floors_arithmetic():
    """MASM's layer path does no ``d_out × d_in`` weight gradient: against the floor, a step adds exactly
    the products with the Km columns of ``V s`` (forward) and ``U`` (input gradient), its two thin gradient
    products and the per-pass operand build, counted by :func:`speed.count_flops`; a full-size weight gradient (as
    Effort's reference computes) would add 2·N·d_out·d_in per layer and fail here."""
    settings = speed.SpeedSettings("tiny-clip", 2, 1, 0, "cpu", 0, "fp32", False, False)
    device = speed._setup(settings)
    steps = {m: speed._TrainingStep(m, settings, device) for m in ("frozen-floor", "masm-path-only")}
    flops = {m: speed.count_flops(step) for m, step in steps.items()}
    layers = [m for m in steps["masm-path-only"].detector.modules() if type(m).__name__ == "MASMLinear"]
    config = steps["masm-path-only"].detector.backbone.config
    tokens = 2 * ((config.image_size // config.patch_size) ** 2 + 1)  # batch 2, patches and the class token
    extra = 0
    for layer in layers:
        d_in, d_out = layer.in_features, layer.out_features
        km = layer.num_subspaces * layer.subspace_rank
        extra += 2 * tokens * km * (d_in + d_out)  # x (V s) in forward, g U in backward
        extra += 2 * tokens * km * (d_out + d_in)  # the thin gradients (x V s)ᵀ g and (g U)ᵀ x
        extra += 2 * d_out * d_in * km  # the operand W_sem + U (V s)ᵀ
    assert layers and flops["frozen-floor"] > 0
    assert flops["masm-path-only"] - flops["frozen-floor"] == extra

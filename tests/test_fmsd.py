"""FMSD: layers chosen before training from their weight gradients' bias and variance, only those adapted.

The scoring on constructed gradient streams; the selection through the real code on a backbone whose dead
layers are known; determinism; unselected layers plain and bit-for-bit frozen; the training phase equal to
a run given the layers from the start; resume without a second selection; two gloo ranks agreeing.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import masm.training.trainer as trainer_module
from masm.errors import ConfigError
from masm.method import MASMConfig, MASMLinear, apply_masm, find_targets
from masm.models import create_detector, load_backbone, load_checkpoint
from masm.training import load_train_config, train
from masm.training.distributed import DistEnv
from masm.training.layer_selection import GradientMoments, select_layers, top_layers
from masm.training.trainer import STATE_HASH_ENV
from test_train_support import TINY_CONFIG, cli_command, make_folder_dataset, tiny_overrides

FMSD = {"model.method.name": "fmsd", "model.method.masm.select.steps": 4, "data.val": "none"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fx", n_real=8, n_fake=8)  # 4 steps/epoch


def _config(data, **extra):
    return load_train_config(TINY_CONFIG, tiny_overrides(data, **{**FMSD, **extra}))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _select_records(run):
    return [r for r in _records(run / "metrics.jsonl") if r.get("kind") == "select"]


class _Captured:
    """Keeps the detector of every run trained while installed (the trainer's ``fit`` wrapped)."""

    def __init__(self, monkeypatch):
        self.detectors = []
        original = trainer_module.fit

        def fit(run):
            original(run)
            self.detectors.append(run.detector)

        monkeypatch.setattr(trainer_module, "fit", fit)


# -- the score -----------------------------------------------------------------------------------------------
def test_learning_state_is_the_gradient_snr_of_running_moments_and_ranks_signal_over_noise():
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(6, 5, generator=gen)
    streams = {
        "consistent": [signal + 0.05 * torch.randn(6, 5, generator=gen) for _ in range(40)],
        "noise": [torch.randn(6, 5, generator=gen) for _ in range(40)],
        "weak": [0.3 * signal + torch.randn(6, 5, generator=gen) for _ in range(40)],
    }
    moments = GradientMoments([signal.shape] * 3)
    for t in range(40):
        moments.add([streams[name][t] for name in streams])
    rho = moments.learning_state()
    for i, stream in enumerate(streams.values()):  # B = ‖μ‖², Var = Σ(ν − μ²) with plain running means
        g = torch.stack(stream).double()
        mu, nu = g.mean(0), g.pow(2).mean(0)
        bias, var = mu.pow(2).sum(), (nu - mu.pow(2)).sum()
        assert float(rho[i]) == pytest.approx(float(bias / (bias + var + 1e-12)), rel=1e-5)
    assert rho[0] > 0.99 and rho[1] < 0.1 and rho[1] < rho[2] < rho[0]
    names = list(streams)
    assert top_layers(names, rho, 0.34) == ["consistent", "weak"]  # ceil(0.34·3) = 2, in model order
    assert top_layers(names, rho, 0.01) == ["consistent"]  # at least one
    # ties keep layer order, so every rank picks alike
    assert top_layers(["a", "b", "c", "d"], torch.tensor([0.5, 0.9, 0.5, 0.5]), 0.5) == ["a", "b"]
    with pytest.raises(ValueError, match="two batches"):
        GradientMoments([signal.shape]).learning_state()


def test_the_select_config_is_checked_and_a_layer_list_adapts_only_those_layers():
    with pytest.raises(ConfigError, match="select.steps"):
        load_train_config(None, ["model.method.name=fmsd", "model.method.masm.select.steps=1"])
    with pytest.raises(ConfigError, match="select.fraction"):
        load_train_config(None, ["model.method.name=fmsd", "model.method.masm.select.fraction=0"])
    fmsd = load_train_config(None, ["model.method.name=fmsd"]).model.method.masm
    assert fmsd.select.enabled and fmsd.select.layers is None and fmsd.select.fraction == 0.5
    assert fmsd.mask.enabled and fmsd.mask.subspace_balance and not fmsd.mask.layer_selection
    assert not load_train_config(None, []).model.method.masm.select.enabled  # masm unchanged
    backbone = load_backbone("tiny-clip")
    names = [n for n, _ in find_targets(backbone, MASMConfig().target_modules)]
    chosen = [names[5], names[0]]
    apply_masm(backbone, MASMConfig(num_subspaces=2, subspace_rank=2, select={"layers": chosen}), False)
    modules = dict(backbone.named_modules())
    assert [n for n in names if isinstance(modules[n], MASMLinear)] == [names[0], names[5]]
    assert all(type(modules[n]) is nn.Linear for n in names if n not in chosen)
    with pytest.raises(ConfigError, match="select.layers names 'nope'"):
        apply_masm(load_backbone("tiny-clip"), MASMConfig(select={"layers": ["nope"]}), False)


def test_the_selection_skips_the_layers_known_to_have_no_gradient(tmp_path, data):
    # Blocks 2 and 3 with v_proj zeroed (weight and bias): their attention output is exactly 0 whatever
    # q and k are, so q_proj, k_proj and out_proj of those blocks get no gradient at all (ρ = 0).
    backbone = load_backbone("tiny-clip")
    for _, linear in find_targets(backbone, r"layers\.[23]\.self_attn\.v_proj$"):
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
    backbone.save_pretrained(tmp_path / "backbone")
    config = _config(data, **{"model.backbone": str(tmp_path / "backbone")})
    config.model.method.masm.select.fraction = 10 / 16  # exactly the live layers
    logged = []
    from masm.training.data import open_run_data

    selection = select_layers(config, open_run_data(config).train.records, DistEnv(), logged.append, tmp_path)
    dead_names = [n for n in selection.names if re.search(r"layers\.[23]\.self_attn\.(q|k|out)_proj$", n)]
    assert len(selection.names) == 16 and len(dead_names) == 6
    scores = dict(zip(selection.names, selection.scores))
    assert all(scores[n] == 0.0 for n in dead_names)
    assert all(scores[n] > 0.0 for n in selection.names if n not in dead_names)
    assert selection.layers == [n for n in selection.names if n not in dead_names]
    assert config.model.method.masm.select.layers == selection.layers
    assert logged == [selection.record(config.model.method.masm.select)]
    assert (tmp_path / "select.png").stat().st_size > 0


# -- through the trainer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """An uninterrupted fmsd run (8 steps) and its in-memory detector."""
    monkeypatch = pytest.MonkeyPatch()
    captured = _Captured(monkeypatch)
    out = tmp_path_factory.mktemp("fmsd") / "run"
    try:
        result = train(_config(data), out, progress=False)
    finally:
        monkeypatch.undo()
    return out, result, captured.detectors[0]


def test_selection_is_logged_drawn_saved_and_unselected_layers_stay_plain_and_frozen(full_run):
    out, result, detector = full_run
    (record,) = _select_records(out)
    assert record["steps"] == 4 and len(record["layers"]) == len(record["scores"]) == 16
    assert len(record["selected"]) == math.ceil(0.5 * 16) and (out / "select.png").stat().st_size > 0
    saved = load_train_config(out / "config.yaml").model.method.masm.select
    assert saved.layers == record["selected"] and saved.enabled
    checkpoint = json.loads((result.last_checkpoint / "config.json").read_text())
    assert checkpoint["model"]["method"]["masm"]["select"]["layers"] == record["selected"]
    # the trained detector: chosen layers adapted, every other target a plain Linear equal to the pretrained
    pretrained = dict(create_detector("tiny-clip", "linear").backbone.named_modules())
    modules = dict(detector.backbone.named_modules())
    for name in record["layers"]:
        if name in record["selected"]:
            assert isinstance(modules[name], MASMLinear), name
            continue
        layer = modules[name]
        assert type(layer) is nn.Linear and not layer.weight.requires_grad, name
        assert torch.equal(layer.weight, pretrained[name].weight) and torch.equal(
            layer.bias, pretrained[name].bias
        )
    # only the chosen layers' subspaces (and the head) are saved as trained
    weights = load_file(str(result.last_checkpoint / "model.safetensors"))
    trained = {key.rsplit(".", 1)[0] for key in weights if not key.startswith("head.")}
    assert {t.split("backbone.", 1)[-1] for t in trained} == set(record["selected"])
    # a checkpoint rebuilds its detector without selecting
    loaded = load_checkpoint(result.last_checkpoint)
    rebuilt = {n for n, m in loaded.backbone.named_modules() if isinstance(m, MASMLinear)}
    assert rebuilt == set(record["selected"])


def test_selection_is_deterministic_and_training_equals_a_run_given_the_layers(tmp_path, data, full_run):
    out, result, _ = full_run
    (first,) = _select_records(out)
    again = train(_config(data), tmp_path / "again", progress=False)
    (second,) = _select_records(tmp_path / "again")
    assert second == first
    given = _config(data)
    given.model.method.masm.select.layers = first["selected"]
    preset = train(given, tmp_path / "given", progress=False)
    assert not _select_records(tmp_path / "given")  # no selection when the layers are given
    a, b, c = (load_file(str(r.last_checkpoint / "model.safetensors")) for r in (result, again, preset))
    assert set(a) == set(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


class Stop(Exception):
    pass


def test_resume_keeps_the_selection_and_does_not_select_again(tmp_path, data, full_run, monkeypatch):
    out, result, _ = full_run
    run = tmp_path / "run"

    def stop_at_3(progress):
        if progress.global_step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(_config(data), run, progress=False, on_step=stop_at_3)
    calls = []
    monkeypatch.setattr(trainer_module, "select_layers", lambda *a, **k: calls.append(a))
    resumed = train(_config(data), run, resume=True, progress=False)  # the original config: layers None
    assert not calls and resumed.global_step == result.global_step
    (record,) = _select_records(run)
    assert record == _select_records(out)[0]
    assert load_train_config(run / "config.yaml").model.method.masm.select.layers == record["selected"]
    a = load_file(str(result.last_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    # other layers than the run's own are a change, refused
    other = _config(data)
    other.model.method.masm.select.layers = record["layers"][:2]
    with pytest.raises(ConfigError, match="select.layers"):
        train(other, run, resume=True, progress=False)


# -- two ranks -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_select_the_same_layers_as_one_process(tmp_path, data, full_run):
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    masm = cli_command(tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    launcher += ["-m", "masm"] if masm[1] == "-m" else [masm[1]]
    argv = launcher + ["train", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    argv += [arg for item in tiny_overrides(data, **FMSD) for arg in ("--set", item)]
    env = dict(os.environ, **{STATE_HASH_ENV: str(hashes), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["selected_layers"] == rank1["selected_layers"]
    assert rank0["params"] == rank1["params"]
    (record,) = _select_records(out)
    assert record["selected"] == rank0["selected_layers"]
    # each rank saw half of every global batch; the all-reduced gradients are the global batch's, as in
    # one process: the same scores up to round-off
    (single,) = _select_records(full_run[0])
    assert record["scores"] == pytest.approx(single["scores"], rel=1e-4, abs=1e-6)
    assert record["selected"] == single["selected"]


# -- the benchmarks ------------------------------------------------------------------------------------------
def test_quality_bench_runs_only_the_rows_asked_for():
    from masm.benchmarks import quality
    from masm.errors import MasmError

    plan = [(m, m, {}) for m in quality.METHODS] + [(k, m, o) for k, (m, o) in quality.ABLATIONS.items()]
    assert quality.only_rows(plan, "") == plan
    assert [row[0] for row in quality.only_rows(plan, "fmsd")] == [
        "fmsd",
        "fmsd fraction=0.25",
        "fmsd fraction=0.75",
    ]
    assert [row[0] for row in quality.only_rows(plan, "fmsd fraction=0.25, lora")] == [
        "lora",
        "fmsd fraction=0.25",
    ]
    assert quality.ABLATIONS["fmsd fraction=0.25"][1]["model"]["method"]["masm"]["select"]["fraction"] == 0.25
    with pytest.raises(MasmError, match="--only 'fmsd fraction=0.3' matches no row"):
        quality.only_rows(plan, "fmsd fraction=0.3")


def test_speed_bench_adapts_half_of_the_layers_spread_over_depth():
    from masm.benchmarks import speed

    assert speed.spread_evenly(list("abcdefgh"), 0.5) == ["a", "c", "e", "g"]
    assert speed.spread_evenly(list("abcde"), 0.5) == ["a", "b", "d"]
    assert speed.spread_evenly(list("abc"), 0.01) == ["a"]
    detector, masm = speed._build("fmsd", speed.SpeedSettings("tiny-clip", 2))
    adapted = [n for n, m in detector.backbone.named_modules() if isinstance(m, MASMLinear)]
    assert len(adapted) == 8 and "encoder.layers.0.self_attn.k_proj" in adapted
    assert masm is not None and masm.mask.subspace_balance and not masm.mask.layer_selection

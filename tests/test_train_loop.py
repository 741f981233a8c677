"""Training loop: end to end on a tiny folder fixture, exact kill-and-resume, NaN stop, bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from masm.errors import CheckpointError, ConfigError, MasmError
from masm.training import load_train_config, train
from masm.training import loop as loop_module
from test_train_support import TINY_CONFIG, make_folder_dataset, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fx")


def _config(data, **extra):
    return load_train_config(TINY_CONFIG, tiny_overrides(data, **extra))


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_train_writes_run_folder_and_logs_every_loss_term(tmp_path, data):
    result = train(
        _config(data, epochs=1, **{"data.test": f"[folder:{data}]"}), tmp_path / "run", progress=False
    )
    out = tmp_path / "run"
    assert result.global_step == 3 and result.epochs_completed == 1
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "masks.jsonl",
        "checkpoints/best/model.safetensors",
        "checkpoints/last/optimizer.safetensors",
        "checkpoints/last/rng.safetensors",
        "checkpoints/last/mask.safetensors",
        "eval/report.json",
        "eval/predictions.csv",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert {"lr", "epoch", "cls", "orth", "spec", "total"} <= set(train_records[0])
    evals = [r for r in records if r["kind"] == "eval"]
    assert (
        evals
        and evals[-1]["select_on"] == "val"
        and result.best_metric == pytest.approx(max(r["metric"] for r in evals))
    )
    # the resolved config reloads to the same config
    reloaded = load_train_config(out / "config.yaml")
    assert reloaded.model.preprocessing is not None and reloaded.model.method.masm.num_subspaces == 2
    assert result.test["datasets"]["fx"]["frame"]["auc"] is not None


def test_kill_and_resume_reaches_the_uninterrupted_parameters(tmp_path, data, monkeypatch):
    # cosine schedule + accumulation + clipping + the mask: everything that carries state across steps
    extra = {
        "epochs": 2,
        "optim.schedule": "cosine",
        "optim.warmup_steps": 1,
        "optim.grad_accum_steps": 2,
        "optim.max_grad_norm": 1.0,
        "data.batch_size": 2,
        "checkpoint_every": 2,
        "data.val": "none",
        "data.augment.enabled": "true",
    }
    config = _config(data, **extra)
    full = train(config, tmp_path / "full", progress=False)
    assert full.global_step == 6

    class Killed(Exception):
        pass

    def kill_after_step_3(progress):
        if progress.global_step == 3:
            raise Killed  # mid-epoch, one step after the last checkpoint (step 2)

    with pytest.raises(Killed):
        train(config, tmp_path / "cut", progress=False, on_step=kill_after_step_3)
    state = json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())
    assert state["progress"]["global_step"] == 2 and state["progress"]["step_in_epoch"] == 2
    resumed = train(config, tmp_path / "cut", resume=True, progress=False)
    assert resumed.global_step == 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    masks_a = load_file(str(tmp_path / "full/checkpoints/last/mask.safetensors"))
    masks_b = load_file(str(tmp_path / "cut/checkpoints/last/mask.safetensors"))
    assert torch.equal(masks_a["mask"], masks_b["mask"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated records after resume


def test_max_steps_stop_then_resume_continues(tmp_path, data):
    cut = _config(data, epochs=1, max_steps=2, **{"data.val": "none"})
    assert train(cut, tmp_path / "run", progress=False).global_step == 2
    result = train(
        _config(data, epochs=1, **{"data.val": "none"}), tmp_path / "run", resume=True, progress=False
    )
    assert result.global_step == 3


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path, data, monkeypatch):
    real_loss = loop_module.total_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, terms = real_loss(*args, **kwargs)
        if calls["n"] == 3:
            loss = loss * float("nan")
            terms = dict(terms, total=loss.detach())
        return loss, terms

    monkeypatch.setattr(loop_module, "total_loss", poisoned)
    with pytest.raises(MasmError, match=r"not finite at step 3 .*checkpoints/last"):
        train(_config(data, **{"data.val": "none"}), tmp_path / "run", progress=False)


def test_existing_run_needs_resume_and_resume_checks_the_model(tmp_path, data):
    config = _config(data, max_steps=1, **{"data.val": "none"})
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(MasmError, match="already holds a run"):
        train(config, tmp_path / "run", progress=False)
    other = _config(data, max_steps=1, **{"data.val": "none", "model.backbone": "clip-vit-b16"})
    with pytest.raises(
        ConfigError, match="differs from the run's own .*model.backbone: 'tiny-clip' -> 'clip-vit-b16'"
    ):
        train(other, tmp_path / "run", resume=True, progress=False)
    # even when changes are allowed, another model cannot continue these weights
    with pytest.raises(CheckpointError, match="backbone 'tiny-clip'.*'clip-vit-b16'"):
        train(other, tmp_path / "run", resume=True, resume_changed=True, progress=False)


def test_folder_training_without_val_spec_is_a_config_error(tmp_path, data):
    with pytest.raises(ConfigError, match="data.val"):
        train(_config(data, **{"data.val": "auto"}), tmp_path / "run", progress=False)


def test_in_memory_records(tmp_path, data):
    from masm.data.spec import open_dataset

    records = open_dataset(f"folder:{data}").records
    config = _config(data, max_steps=1, **{"data.train": "''", "data.val": "none"})
    result = train(config, tmp_path / "run", progress=False, train_data=records, val_data=records)
    assert result.global_step == 1 and result.best_metric is not None


@pytest.mark.parametrize(
    "argv_extra, message",
    [
        (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
        (["--set", "optim.lr=fast"], "optim.lr: expected a number"),
        (["--set", "model.method.name=nope"], "unknown method 'nope'"),
        (["--set", "data.train=folder:/nonexistent/ds"], "dataset folder not found"),
    ],
)
def test_train_cli_bad_input_is_one_line(tmp_path, data, capsys, monkeypatch, argv_extra, message):
    argv = ["train", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--no-progress"]
    argv += ["--set", f"data.train=folder:{data}", "--set", f"data.val=folder:{data}", *argv_extra]
    assert run_cli(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

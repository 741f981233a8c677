"""Resume that trusts nothing it is given: the run's own config, refused changes, best never made worse,
no resume without a run, no fresh run over an earlier one, and in-memory data a saved config can find."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from masm.errors import CheckpointError, ConfigError, MasmError
from masm.training import load_train_config, train
from masm.training import validation as validation_module
from masm.training.data import open_run_data
from test_train_support import TINY_CONFIG, make_folder_dataset, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fx")  # 12 frames: 3 steps an epoch


class Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step(progress):
        if progress.global_step == step:
            raise Stop

    return on_step


def _config(data, **extra):
    return load_train_config(TINY_CONFIG, tiny_overrides(data, **{"data.val": "none", **extra}))


def test_resume_with_a_changed_learning_rate_is_refused_naming_it(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(_config(data), run, progress=False, on_step=_stop_at(2))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.0005.*--resume-changed"):
        train(_config(data, **{"optim.lr": 5e-4}), run, resume=True, progress=False)
    # the run's length may change without being told
    assert train(_config(data, epochs=3), run, resume=True, progress=False).global_step == 9
    assert not (run / "changes.jsonl").read_text().count("optim.lr")
    result = train(
        _config(data, epochs=4, **{"optim.lr": 5e-4}), run, resume=True, resume_changed=True, progress=False
    )
    assert result.global_step == 12
    changes = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert ["optim.lr", 0.001, 0.0005] in changes[-1]["changes"] and changes[-1]["resumed_at_step"] == 9
    assert load_train_config(run / "config.yaml").optim.lr == 5e-4  # the run's config says what it now is


def test_resume_out_alone_continues_with_the_runs_own_config(tmp_path, data, monkeypatch, capsys):
    run = tmp_path / "run"
    config = _config(data, **{"optim.lr": 3e-3})  # not the file's value: only the run knows it
    full = train(config, tmp_path / "full", progress=False)
    with pytest.raises(Stop):
        train(config, run, progress=False, on_step=_stop_at(4))
    assert run_cli(["train", "--resume", "--out", str(run), "--no-progress"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and f"trained {full.global_step} steps" in out
    a = load_file(str(full.last_checkpoint / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    # a --set that changes the run is refused, one line naming the key
    argv = ["train", "--resume", "--out", str(run), "--no-progress", "--set", "optim.lr=0.01"]
    assert run_cli(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr: 0.003 -> 0.01" in err and len(err.splitlines()) == 1


def test_no_resume_without_a_run_and_no_fresh_run_over_one(tmp_path, data, monkeypatch, capsys):
    empty = tmp_path / "empty"
    assert run_cli(["train", "--resume", "--out", str(empty)], monkeypatch) == 2
    assert f"{empty} holds no run to resume" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds no run to resume"):
        train(_config(data), empty, resume=True, progress=False)
    run = tmp_path / "run"
    train(_config(data, max_steps=1), run, progress=False)
    with pytest.raises(MasmError, match="already holds a run.*--overwrite"):
        train(_config(data, max_steps=1), run, progress=False)
    (run / "keep.txt").write_text("not the run's")
    assert train(_config(data, max_steps=2), run, progress=False, overwrite=True).global_step == 2
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (run / "keep.txt").is_file()  # the old run's records are gone, nothing else


def _scripted_metrics(monkeypatch, metrics: list[float]) -> None:
    """Validations return these metrics in turn (one validation per step in these tests)."""
    calls = iter(metrics)
    monkeypatch.setattr(validation_module.Selection, "score", lambda self, detector, env: (next(calls), {}))


def test_best_is_never_replaced_by_a_worse_model_across_a_resume(tmp_path, data, monkeypatch):
    _scripted_metrics(monkeypatch, [0.9, 0.5, 0.6, 0.7, 0.8, 0.85])
    extra = {"data.val": f"folder:{data}", "eval_unit": "step", "eval_every": 1, "checkpoint_every": 1}
    config = _config(data, **extra)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(config, run, progress=False, on_step=_stop_at(2))
    best = (run / "checkpoints/best/model.safetensors").read_bytes()
    result = train(config, run, resume=True, progress=False)
    assert result.global_step == 6 and result.best_step == 1 and result.best_metric == 0.9
    assert (run / "checkpoints/best/model.safetensors").read_bytes() == best
    info = json.loads((run / "checkpoints/best/config.json").read_text())["info"]
    assert info["global_step"] == 1 and info["selection_rule"].startswith("val:folder:")


def test_a_resume_that_drops_validation_keeps_the_selected_best_aside(tmp_path, data, monkeypatch):
    _scripted_metrics(monkeypatch, [0.9, 0.5])
    extra = {"eval_unit": "step", "eval_every": 1, "checkpoint_every": 1}
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(
            _config(data, **{"data.val": f"folder:{data}"}, **extra), run, progress=False, on_step=_stop_at(2)
        )
    best = (run / "checkpoints/best/model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="data.val"):
        train(_config(data, **extra), run, resume=True, progress=False)
    result = train(_config(data, **extra), run, resume=True, resume_changed=True, progress=False)
    # the model selected on validation is kept as it was; best is now the final model, as the rule says
    assert (run / "checkpoints/best-until-step-2/model.safetensors").read_bytes() == best
    assert result.best_step == 6
    info = json.loads((run / "checkpoints/best/config.json").read_text())["info"]
    assert info["global_step"] == 6 and info["selection_rule"] == "none"


def test_in_memory_data_is_recorded_so_the_saved_config_trains_again(tmp_path, data):
    from masm.data.spec import open_dataset

    records = open_dataset(f"folder:{data}").records
    config = _config(data, max_steps=1, **{"data.train": "''"})
    train(config, tmp_path / "run", progress=False, train_data=records, val_data=records)
    saved = load_train_config(tmp_path / "run" / "config.yaml")
    assert saved.data.train == f"frames:{tmp_path / 'run' / 'data' / 'train.jsonl'}"
    reopened = open_run_data(saved)
    assert reopened.train.records == records and reopened.val.records == records
    assert train(saved, tmp_path / "again", progress=False).global_step == 1

"""Training configs: typed, overlayable, strict; every shipped config file loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from masm.errors import ConfigError
from masm.models import METHODS
from masm.training import TrainConfig, config_to_dict, load_train_config, train_config_from_dict
from masm.training.config import DataConfig, OptimConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_FILES = sorted(CONFIGS.glob("clip-vit-*/*.yaml"))


def test_defaults_follow_the_protocol():
    c = TrainConfig()
    assert (c.optim.lr, c.optim.weight_decay, c.data.batch_size, c.epochs, c.seed) == (
        2e-4,
        5e-4,
        32,
        10,
        1024,
    )
    assert (c.data.frames_train, c.data.frames_test, c.select_on, c.precision) == (8, 32, "val", "auto")


@pytest.mark.parametrize("cls", [TrainConfig, DataConfig, OptimConfig])
def test_every_field_has_help(cls):
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_round_trips(path):
    config = load_train_config(path)
    assert train_config_from_dict(config_to_dict(config)) == config


def test_real_protocol_files_cover_every_method_and_both_backbones():
    for backbone in ("clip-vit-l14", "clip-vit-b16"):
        names = {p.stem for p in (CONFIGS / backbone).glob("*.yaml")} - {"backbone"}
        assert names == set(METHODS)
        for name in names:
            config = load_train_config(CONFIGS / backbone / f"{name}.yaml")
            assert config.model.backbone == backbone and config.model.method.name == name
            assert config.data.train.endswith("FaceForensics++.json@train") and len(config.data.test) == 5
            assert config.select_on == "val"
            # method files overlay the shared base instead of copying it
            assert "base" in yaml.safe_load((CONFIGS / backbone / f"{name}.yaml").read_text())


def test_method_preset_chosen_by_name_and_overridable():
    c = load_train_config(None, ["model.method.name=effort"])
    assert (c.model.method.masm.num_subspaces, c.model.method.masm.subspace_rank) == (1, 1)
    assert not c.model.method.masm.mask.enabled
    c = load_train_config(None, ["model.method.masm.num_subspaces=2"])
    assert c.model.method.name == "masm" and c.model.method.masm.num_subspaces == 2
    assert load_train_config(None, ["model.method.name=lora"]).model.method.masm_config is None


def test_yaml_base_overlay_and_set_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 3\noptim: {lr: 0.1, name: adamw}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptim: {lr: 0.01}\n")
    c = load_train_config(tmp_path / "run.yaml", ["optim.warmup_steps=5"])
    assert (c.epochs, c.optim.lr, c.optim.name, c.optim.warmup_steps) == (3, 0.01, "adamw", 5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epochz=3"], "unknown config key 'epochz'"),
        (["data.frames=3"], "unknown config key 'data.frames'"),
        (["model.method.masm.num_subspace=3"], "unknown config key 'model.method.masm.num_subspace'"),
        (["data.augment.flip=0.5"], "unknown config key 'data.augment.flip'"),
        (["epochs=ten"], "epochs: expected an integer"),
        (["data.balance=3"], "data.balance: expected true or false"),
        (["optim.name=sgd"], "optim.name: 'sgd' is not one of"),
        (["select_on=train"], "select_on"),
        (["model.method.name=nope"], "unknown method 'nope'"),
        (["model.method=3"], "model.method: expected a mapping"),
        (["epochs=0"], "epochs: value 0 is out of range"),
        (["data.label_dict.X=maybe"], "data.label_dict.X: expected an integer"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_train_config(None, overrides)


def test_unknown_key_in_a_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_train_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "raw, value", [("1e-4", 1e-4), ("2E-3", 2e-3), ("-1.5e2", -150.0), ("3", 3.0), ("1.0e-8", 1e-8)]
)
def test_numbers_in_exponent_notation_are_numbers(raw, value):
    # YAML 1.1 reads "1e-4" (no dot) as a string; in a float field it is the number a user meant
    assert load_train_config(None, [f"optim.eps={raw}"]).optim.eps == value


def test_a_word_in_a_number_field_is_still_refused():
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got '1e-4x'"):
        load_train_config(None, ["optim.lr=1e-4x"])

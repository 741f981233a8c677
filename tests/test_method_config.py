"""MASM's config: every field documented; settings that make a requested mechanism a no-op are errors naming
the keys; every shipped preset, config file and benchmark variant still loads (issue 18)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from masm.errors import ConfigError, SettingsError
from masm.method import MaskConfig, MASMConfig, SelectConfig
from masm.models import METHODS
from masm.models.methods import method_config
from masm.training import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("cls", [MASMConfig, MaskConfig, SelectConfig])
def test_every_field_has_help(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


@pytest.mark.parametrize(
    "overrides, keys",
    [
        # the guard penalty requested, but weightless
        (
            ["model.method.masm.semantic_guard=penalty", "model.method.masm.lambda_guard=0"],
            ["model.method.masm.semantic_guard", "model.method.masm.lambda_guard"],
        ),
        # a penalty weight for a guard that is not a penalty
        (
            ["model.method.masm.semantic_guard=project", "model.method.masm.lambda_guard=0.5"],
            ["model.method.masm.lambda_guard", "model.method.masm.semantic_guard"],
        ),
        (["model.method.masm.lambda_orth=-1"], ["model.method.masm.lambda_orth"]),
        (
            ["model.method.masm.semantic_guard=penalty", "model.method.masm.lambda_guard=-0.5"],
            ["model.method.masm.lambda_guard"],
        ),
        # a mask enabled with no rule that could act
        (
            ["model.method.masm.mask.layer_selection=false", "model.method.masm.mask.subspace_balance=false"],
            [f"model.method.masm.mask.{k}" for k in ("enabled", "layer_selection", "subspace_balance")],
        ),
        (
            ["model.method.masm.mask.top_fraction=1.0"],
            ["model.method.masm.mask.layer_selection", "model.method.masm.mask.top_fraction"],
        ),
        (
            ["model.method.masm.num_subspaces=1", "model.method.masm.mask.layer_selection=false"],
            ["model.method.masm.num_subspaces", "model.method.masm.mask.enabled"],
        ),
        # shares are at most 1: (1 + delta)/K >= 1 never pauses anything
        (
            ["model.method.masm.num_subspaces=2", "model.method.masm.mask.delta=1.0"],
            ["model.method.masm.mask.delta", "model.method.masm.num_subspaces"],
        ),
    ],
)
def test_settings_that_make_a_requested_mechanism_a_no_op_are_errors_naming_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as caught:  # the training loader re-raises it as a plain ConfigError
        load_train_config(None, overrides)
    for key in keys:
        assert repr(key) in str(caught.value)


def test_consistent_neighbours_of_the_rejected_settings_are_accepted():
    accepted = [
        [
            "model.method.masm.semantic_guard=penalty",
            "model.method.masm.lambda_orth=0",
        ],  # guard without L_orth
        ["model.method.masm.semantic_guard=project", "model.method.masm.lambda_guard=0"],  # no penalty
        ["model.method.masm.lambda_spec=0", "model.method.masm.spectral_mode=energy"],  # a default-like knob
        ["model.method.masm.mask.layer_selection=false"],
        ["model.method.masm.mask.subspace_balance=false", "model.method.masm.mask.top_fraction=0.5"],
        ["model.method.masm.num_subspaces=1"],  # layer selection still acts
        ["model.method.masm.num_subspaces=2", "model.method.masm.mask.delta=0.9"],
        ["model.method.masm.mask.enabled=false", "model.method.masm.mask.layer_selection=false"],
    ]
    for overrides in accepted:
        load_train_config(None, overrides)


def test_direct_construction_names_the_keys_relative_to_the_config():
    with pytest.raises(SettingsError, match="'semantic_guard', 'lambda_guard'"):
        MASMConfig(semantic_guard="penalty", lambda_guard=0.0)
    with pytest.raises(SettingsError, match="'mask.enabled', 'mask.layer_selection'"):
        MASMConfig(mask={"layer_selection": False, "subspace_balance": False})
    with pytest.raises(SettingsError, match="'mask.delta'"):
        MASMConfig(num_subspaces=3, mask=MaskConfig(delta=2.0))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_preset_loads_and_penalty_presets_keep_the_weight_they_had_in_l_orth(name):
    masm = method_config(name).masm
    if masm.semantic_guard == "penalty":
        # the penalty was part of L_orth, weighted by lambda_orth: the same weight keeps the objective
        assert masm.lambda_guard == masm.lambda_orth
    assert load_train_config(None, [f"model.method.name={name}"]).model.method.masm == masm


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    load_train_config(path)


def test_every_benchmark_variant_builds_its_config():
    from masm.benchmarks import quality, speed
    from masm.demo.experiment import RunSettings, train_config

    variants = {name: (name, {}) for name in quality.METHODS} | quality.ABLATIONS | quality.MORE_ABLATIONS
    splits = SimpleNamespace(train_families=["blend"], strength=quality.STRENGTH)  # what train_config reads
    for settings in (RunSettings(), RunSettings(steps=500)):  # the demo's budget and the bench's default
        for method, overrides in variants.values():
            train_config(method, splits, settings, seed=0, overrides=overrides)
    detector, masm = speed._build("masm-path-only", speed.SpeedSettings("tiny-clip", 2))  # its bare MASM
    assert masm is not None and masm.semantic_guard == "off" and not masm.mask.enabled

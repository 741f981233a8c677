"""Every ``--help`` of the command line reads as plain words: no reStructuredText or Markdown markup, no
notes for developers, each option's default shown, and ``masm --version``."""

from __future__ import annotations

import argparse
import re

import pytest

from masm.cli.main import build_parser, main

# reStructuredText roles and literals, Markdown code spans, and words only a developer needs.
MARKUP = re.compile(r"``|`|:(mod|class|func|meth|data|attr):|\bmasm\.[a-z_]+\.[a-z_]+|add_arguments|<module>")


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command line, parser) for masm and every sub-command, bench and import sub-commands included."""
    found = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "masm")
    return found


PARSERS = all_parsers()


def test_every_command_is_reached():
    names = {name for name, _ in PARSERS}
    assert {
        "masm train",
        "masm eval",
        "masm import effort",
        "masm bench speed",
        "masm bench explain",
        "masm calibrate",
    } <= names
    assert len(names) == 21


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_help_is_plain_words(name, parser):
    text = parser.format_help()
    assert not MARKUP.search(text), (
        f"{name} --help shows markup or developer notes: {MARKUP.search(text)[0]!r}"
    )
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    assert parser.description, f"{name} has no description"


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_has_help_and_states_its_default(name, parser):
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        flag = action.option_strings[-1]
        assert action.help, f"{name} {flag} has no help text"
        if action.nargs == 0 or action.required:  # a switch, or an option without a default
            continue
        shown = parser._get_formatter()._get_help_string(action)
        assert "default" in shown, f"{name} {flag}: its help does not say what happens without it"


def test_defaults_are_the_values_used():
    helps = {name: parser.format_help() for name, parser in PARSERS}
    assert re.search(r"--batch-size BATCH_SIZE\s+frames per forward pass \(default: 64\)", helps["masm eval"])
    assert re.search(r"--seed SEED\s+seed of the perturbations \(default: 0\)", helps["masm eval"])
    assert "(default: 0 1 2)" in helps["masm bench explain"]


def test_synth_help_gives_the_demos_real_strength():
    from masm.cli.synth import DEMO_STRENGTH
    from masm.demo.experiment import DEMO_STRENGTH as USED

    assert DEMO_STRENGTH == USED
    text = " ".join(dict(PARSERS)["masm synth"].format_help().split())
    assert f"masm demo and masm bench quality use {USED:g})" in text


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"masm {version('masm')}"


def test_offline_backbone_advice_names_flags_that_exist(monkeypatch):
    from masm.errors import MasmError
    from masm.models import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MasmError) as err:
        load_backbone("clip-vit-b16")
    advice = str(err.value)
    assert "masm train CONFIG --set model.backbone=DIR" in advice and "pass --backbone" not in advice
    parser = build_parser()
    args = parser.parse_args(["train", "c.yaml", "--set", "model.backbone=DIR"])
    assert args.overrides == ["model.backbone=DIR"]
    assert parser.parse_args(["bench", "speed", "--backbone", "DIR"]).backbone == "DIR"
    assert (
        parser.parse_args(["import", "effort", "x.pth", "--out", "o", "--backbone", "DIR"]).backbone == "DIR"
    )
    with pytest.raises(SystemExit):  # what the advice used to say does not exist
        parser.parse_args(["train", "c.yaml", "--backbone", "DIR"])

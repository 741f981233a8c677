"""MkDocs hook: pages generated from the code at build time, so that they cannot drift from it.

* ``<!-- generated: cli -->`` becomes the command-line reference, built from ``masm.cli.main.build_parser()``
  (every subcommand, positional argument and flag with its default and help text);
* ``<!-- generated: config -->`` becomes the configuration reference, built from the config dataclasses
  (every key, its type, default and the ``metadata["help"]`` of its field), plus the method presets;
* ``<!-- generated: serve-options -->`` becomes the table of ``masm serve``'s settings (``ServeOptions``);
* ``changelog.md`` is the repository's ``CHANGELOG.md`` and ``images/explain.png`` the explanation
  benchmark's figure, so that neither is copied by hand.

The functions are plain (no MkDocs import) so that ``tests/test_docs_commands.py`` can render the pages too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Files outside docs/ that become pages or images of the site: site path -> repository path.
GENERATED_FILES = {
    "changelog.md": ROOT / "CHANGELOG.md",
    "images/explain.png": ROOT / "benchmarks" / "results" / "explain.png",
}
HELP_WIDTH = 100


# -- command line -----------------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands, name -> parser (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _text(text: object) -> str:
    """Help text as Markdown prose: ``<name>`` is text, not an HTML tag."""
    return " ".join(str(text).split()).replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: object) -> str:
    return _text(text).replace("|", "\\|")


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as ``masm ... --help`` prints it (the parser's own formatter), with the default."""
    formatter = parser._get_formatter()
    text = formatter._expand_help(action) if action.help else ""
    default = action.default
    shown = action.nargs != 0 and action.option_strings and default not in (None, argparse.SUPPRESS, [], "")
    if shown and "default" not in text:  # a formatter that does not add defaults itself
        text = f"{text} (default: {default})"
    return " ".join(text.split())


def _argument_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str | None:
    if (
        isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        or action.help is argparse.SUPPRESS
    ):
        return None
    if action.option_strings:
        name = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest}`" + (" (one or more)" if action.nargs == "+" else "")
        name += " (optional)" if action.nargs == "?" else ""
    details = []
    if action.choices is not None:
        details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.required and action.option_strings:
        details.append("required")
    if action.option_strings and isinstance(action, argparse._AppendAction):
        details.append("repeatable")
    help_text = _help_text(parser, action)
    if details:
        help_text = f"{help_text} ({'; '.join(details)})" if help_text else "; ".join(details)
    return f"| {name} | {_cell(help_text)} |"


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=HELP_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _command_section(parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    if parser.description:
        lines += [_text(parser.description), ""]
    lines += ["```text", _usage(parser), "```", ""]
    rows = [row for action in parser._actions if (row := _argument_row(parser, action))]
    if rows:
        lines += ["| argument | meaning |", "| --- | --- |", *rows, ""]
    children = subcommands(parser)
    if children:
        lines += ["Subcommands: " + ", ".join(f"`{name}`" for name in children) + ".", ""]
        for child in children.values():
            lines += _command_section(child, min(level + 1, 4))
    return lines


def cli_reference() -> str:
    """Markdown reference of every ``masm`` subcommand, from the parser the command line itself uses."""
    from masm.cli.main import build_parser

    parser = build_parser()
    parser.prog = "masm"
    lines = ["```text", _usage(parser), "```", ""]
    rows = [row for action in parser._actions if (row := _argument_row(parser, action))]
    lines += ["| argument | meaning |", "| --- | --- |", *rows, ""]
    for child in subcommands(parser).values():
        lines += _command_section(child, 2)
    return "\n".join(lines)


# -- configuration ----------------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    if value == "":
        return '""'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _dataclass_of(hint: object) -> type | None:
    """The dataclass a type hint names (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_tables(cls: type, prefix: str = "", level: int = 3) -> list[str]:
    """One table per dataclass: its plain keys; nested dataclasses get their own section after it."""
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        inner = _dataclass_of(hints[f.name])
        if inner is not None:
            nested.append((key, inner, f))
            continue
        default = _default_of(f)
        default_text = "(required)" if default is dataclasses.MISSING else f"`{_format_value(default)}`"
        type_text = str(f.type).replace("typing.", "")
        rows.append(
            f"| `{key}` | `{_cell(type_text)}` | {_cell(default_text)} | {_cell(f.metadata.get('help', ''))} |"
        )
    lines = []
    doc = " ".join((cls.__doc__ or "").split())
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    if rows:
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    for key, inner, f in nested:
        heading = f"{'#' * level} `{key}`"
        help_text = f.metadata.get("help", "")
        lines += [
            heading,
            "",
            f"{help_text[:1].upper() + help_text[1:]} (`{inner.__module__}.{inner.__name__}`).",
            "",
        ]
        if _default_of(f) is None:
            lines += ["Default `null`; the keys below apply when it is given.", ""]
        lines += config_tables(inner, key + ".", min(level + 1, 6))
    return lines


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((prefix + key, value))
    return items


def method_presets() -> str:
    """Each method preset as the keys it changes under ``model.method`` (all else: the defaults above)."""
    from masm.config import to_dict
    from masm.models.methods import METHODS, MethodConfig

    defaults = dict(_flatten(to_dict(MethodConfig())))
    lines = ["| `model.method.name` | what the preset changes under `model.method` |", "| --- | --- |"]
    for name, overlay in METHODS.items():
        changed = [(k, v) for k, v in _flatten(overlay) if defaults.get(k, object()) != v]
        keys = ", ".join(f"`{k}: {_format_value(v)}`" for k, v in changed) or "nothing: the defaults"
        lines.append(f"| `{name}` | {_cell(keys)} |")
    return "\n".join(lines)


def config_reference() -> str:
    from masm.training.config import TrainConfig

    lines = ["## Training run (`masm.training.config.TrainConfig`)", ""]
    lines += config_tables(TrainConfig, "", 3)
    lines += ["## Method presets", "", method_presets(), ""]
    return "\n".join(lines)


def serve_options() -> str:
    from masm.serve.options import ServeOptions

    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(ServeOptions):
        if f.name == "faces":  # a switch that turns the default off
            lines.append(
                f"| `--no-faces` | faces on | off: score whole images; on: {_cell(f.metadata['help'])} |"
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        lines.append(
            f"| `{flag}` | `{_format_value(_default_of(f))}` | {_cell(f.metadata.get('help', ''))} |"
        )
    return "\n".join(lines)


def method_knobs() -> str:
    from masm.method.config import MASMConfig

    return "\n".join(config_tables(MASMConfig, "model.method.masm.", 3))


def backbones() -> str:
    from masm.models.backbones import BACKBONES

    lines = ["| name | what | weights from | family |", "| --- | --- | --- | --- |"]
    for spec in BACKBONES.values():
        source = (
            f"`{spec.hub_id}`" if spec.hub_id else ("shipped with masm" if spec.local_dir else "random init")
        )
        lines.append(f"| `{spec.name}` | {_cell(spec.description)} | {source} | {spec.family} |")
    return "\n".join(lines)


GENERATORS = {
    "backbones": backbones,
    "cli": cli_reference,
    "config": config_reference,
    "method-knobs": method_knobs,
    "serve-options": serve_options,
}


# -- MkDocs events ----------------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for site_path, source in GENERATED_FILES.items():
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files


# ``<!-- generated: NAME -->``, optionally followed by placeholder text up to ``<!-- /generated -->`` (what a
# reader of the source file on a forge sees instead of the table).
MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->(?:.*?<!-- /generated -->)?", re.DOTALL)


def render_generated(markdown: str) -> str:
    """``markdown`` with every generated marker replaced by its content; an unknown name is an error."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated section {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return render_generated(markdown)

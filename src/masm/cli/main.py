"""``masm`` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``register(subparsers)`` (adds its parser and sets ``func``) and keeps its
heavy imports inside the function it runs, so ``masm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from masm.errors import MasmError

# Subcommand modules under masm.cli, in the order ``--help`` lists them.
COMMANDS = [
    "train",
    "eval",
    "calibrate",
    "detect",
    "serve",
    "export",
    "importer",
    "preprocess",
    "synth",
    "demo",
    "bench",
]


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default.

    Switches and options whose default is None say nothing more: their help text states in words what
    happens when they are left out (tests/test_cli_help.py checks that every option's does).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = action.nargs == 0  # --x switches on (or off) what is otherwise off (or on)
        unset = default is None or default is argparse.SUPPRESS
        if flag or unset or action.required or not action.option_strings or "default" in text:
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(item) for item in default)
        default = default if default != "" else "none"
        shown = str(default).replace("%", "%%")  # argparse %-formats help texts
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """Every masm parser, sub-commands included (they inherit the class): same help formatting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def installed_version() -> str:
    """The installed distribution's version (the package's own when it runs from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("masm")
    except PackageNotFoundError:
        from masm import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="masm",
        description="Deepfake detection with Multi-Artifact Subspaces and selective layer Masks.",
    )
    parser.add_argument("--version", action="version", version=f"masm {installed_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"masm.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MasmError as err:
        print(f"masm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"masm {args.command}: interrupted", file=sys.stderr)
        return 130

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
COMMANDS = ["train", "eval", "detect", "serve", "export", "importer", "preprocess", "synth", "demo", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masm",
        description="Deepfake detection with Multi-Artifact Subspaces and selective layer Masks.",
    )
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

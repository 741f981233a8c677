"""Every ``masm`` command shown in the README and the docs exists, with the flags shown.

Commands are read from the shell blocks (```bash, ```console, ```text lines starting with ``$ ``) and from
inline code spans that start with ``masm ``; ``torchrun ... -m masm``, ``python -m masm`` and ``time masm``
count too. Each is walked through ``masm.cli.main.build_parser()``: the subcommand chain must exist, every
flag must belong to the (sub)command it is given to, and a value of a flag with fixed choices must be one of
them. Upper-case words (``CONFIG``, ``COMMAND``) and ``[...]`` brackets of a synopsis are placeholders.

The generated reference pages (docs/hooks/reference.py) are rendered too, and must list every subcommand,
flag and config key.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from masm.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(bash|console|sh|shell|text)\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")
SEPARATORS = {"|", "||", "&&", ";", "&"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_.:\[\]-]*$")


def load_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_fences(text: str) -> str:
    return SHELL_BLOCK.sub("", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell blocks (continuations joined) and the inline code spans."""
    lines = []
    for lang, body in SHELL_BLOCK.findall(text):
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.strip()
            if lang in ("console", "text"):
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            lines.append(line)
    for span in INLINE_CODE.findall(_without_fences(text)):
        span = " ".join(span.split())
        if span.startswith("masm ") or " -m masm " in f" {span} ":
            lines.append(span)
    return lines


def masm_invocations(line: str) -> list[list[str]]:
    """The argument lists given to ``masm`` on one shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose: not a command
        return []
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for words in segments:
        while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in ("time", "$")):
            words = words[1:]
        if words and words[0] == "masm":
            found.append(words[1:])
        elif words and "-m" in words:
            at = words.index("-m")
            if words[at + 1 : at + 2] == ["masm"]:
                found.append(words[at + 2 :])
    return [_clean(args) for args in found]


def _clean(args: list[str]) -> list[str]:
    cleaned = []
    for arg in args:
        if arg in ("[", "]", "...", "..."):
            continue
        arg = arg.lstrip("[") if arg.startswith("[-") else arg
        arg = arg.rstrip("]") if arg.endswith("]") and "[" not in arg else arg
        if arg and arg != "...":
            cleaned.append(arg)
    return cleaned


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def check_invocation(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Problems of ``masm ARGS`` against ``parser``: unknown subcommands, flags or choices."""
    problems, prog = [], "masm"
    i = 0
    while i < len(args):
        arg = args[i]
        options, children = _options(parser), _subcommands(parser)
        if arg.startswith("-") and len(arg) > 1:
            flag, has_value, value = arg.partition("=")
            action = options.get(flag)
            if action is None:
                problems.append(f"{prog}: no option {flag}")
                i += 1
                continue
            if action.nargs != 0 and not has_value:
                value = args[i + 1] if i + 1 < len(args) else None
                i += 1
            if action.choices is not None and value is not None and not PLACEHOLDER.match(value):
                if value not in action.choices:
                    problems.append(f"{prog} {flag}: {value!r} is not one of {sorted(action.choices)}")
        elif children:
            if PLACEHOLDER.match(arg):  # masm COMMAND --help: any subcommand
                return problems
            if arg not in children:
                problems.append(f"{prog}: no subcommand {arg!r} (known: {', '.join(children)})")
                return problems
            parser, prog = children[arg], f"{prog} {arg}"
        i += 1
    return problems


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in DOC_FILES:
        for line in shell_lines(path.read_text(encoding="utf-8")):
            for args in masm_invocations(line):
                found.append((path.relative_to(ROOT).as_posix(), line, args))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    files = {name for name, _, _ in COMMANDS}
    assert "README.md" in files and "docs/training.md" in files
    assert len(COMMANDS) > 50


def test_every_documented_command_exists_with_its_flags():
    parser = build_parser()
    problems = []
    for name, line, args in COMMANDS:
        problems += [f"{name}: `{line}`: {problem}" for problem in check_invocation(parser, args)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("masm train configs/x.yaml --out runs/x --resum", "masm train: no option --resum"),
        ("masm evaluate ckpt --data folder:x", "masm: no subcommand 'evaluate'"),
        ("masm export ckpt --format tflite --out x", "masm export --format: 'tflite' is not one of"),
        ("torchrun --nproc_per_node 4 -m masm train c.yaml --epochs 3", "masm train: no option --epochs"),
        ("masm bench speedy", "masm bench: no subcommand 'speedy'"),
        ("find . | masm detect ckpt - --explain-dir maps", "masm detect: no option --explain-dir"),
    ],
)
def test_a_renamed_flag_or_command_is_caught(line, problem):
    problems = [p for args in masm_invocations(line) for p in check_invocation(build_parser(), args)]
    assert problems and problems[0].startswith(problem), problems


def test_shell_lines_reads_blocks_transcripts_and_inline_code():
    text = (
        "Run `masm demo --quick` first.\n\n```bash\nmasm train a.yaml \\\n    --out r  # comment\n```\n\n"
        '```text\n$ masm detect m x.png\n{"score": 1}\n```\n'
    )
    assert [args for line in shell_lines(text) for args in masm_invocations(line)] == [
        ["train", "a.yaml", "--out", "r"],
        ["detect", "m", "x.png"],
        ["demo", "--quick"],
    ]


def test_the_generated_cli_page_lists_every_subcommand_and_flag():
    page = load_reference().cli_reference()

    def walk(parser, prog):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):  # -h/--help: on every command, not listed
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in page, f"{prog} {flag} missing from the CLI page"
        for name, child in _subcommands(parser).items():
            assert f"`{prog} {name}`" in page, f"{prog} {name} missing from the CLI page"
            walk(child, f"{prog} {name}")

    walk(build_parser(), "masm")


def test_the_generated_config_page_lists_every_key():
    from masm.training.config import TrainConfig

    reference = load_reference()
    page = reference.config_reference()

    def keys(cls, prefix=""):
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = reference._dataclass_of(hints[f.name])
            yield from keys(inner, f"{prefix}{f.name}.") if inner else [prefix + f.name]

    missing = [key for key in keys(TrainConfig) if f"`{key}`" not in page]
    assert not missing, missing
    assert "`model.method.masm.lambda_guard`" in page and "`data.max_failed_share`" in page


def test_every_generated_marker_in_the_docs_is_known():
    reference = load_reference()
    for path in DOC_FILES:
        for name in re.findall(r"<!-- generated: ([a-z-]+) -->", path.read_text(encoding="utf-8")):
            assert name in reference.GENERATORS, f"{path.name}: unknown generated section {name!r}"

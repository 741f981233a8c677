"""Shared builders for the training/eval tests (imported by test_train_*.py and test_eval_*.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

import masm.cli.main as cli_main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def make_folder_dataset(
    root: Path, n_real: int = 6, n_fake: int = 6, seed: int = 0, only_real: bool = False
) -> Path:
    """``root/real/*.png`` and ``root/fake/<family>/*.png``: random 32-px images, fakes with a bright band."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    groups = [("real", n_real)]
    if not only_real:
        groups += [("fake/fam1", n_fake // 2), ("fake/fam2", n_fake - n_fake // 2)]
    for folder, n in groups:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if folder != "real":
                pixels[:8] = 255
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
    return root


def tiny_overrides(data: Path, **extra) -> list[str]:
    items = {"data.train": f"folder:{data}", "data.val": f"folder:{data}", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def available_commands() -> list[str]:
    """The subcommand modules that exist in this checkout (others may still be in progress)."""
    return [c for c in cli_main.COMMANDS if importlib.util.find_spec(f"masm.cli.{c}") is not None]


def run_cli(argv: list[str], monkeypatch) -> int:
    """``masm ARGV`` in-process, registering only the subcommands present in this checkout."""
    monkeypatch.setattr(cli_main, "COMMANDS", available_commands())
    return cli_main.main(argv)


def cli_command(tmp_path: Path) -> list[str]:
    """Argv prefix running ``masm`` in a subprocess (``-m masm`` once every subcommand module exists)."""
    if available_commands() == cli_main.COMMANDS:
        return [sys.executable, "-m", "masm"]
    shim = tmp_path / "masm_shim.py"
    shim.write_text(
        f"import sys\nimport masm.cli.main as m\nm.COMMANDS = {available_commands()!r}\nsys.exit(m.main())\n"
    )
    return [sys.executable, str(shim)]

"""The command line and output every ``masm bench NAME`` shares.

Each benchmark writes its result as JSON to ``--out FILE.json`` (default ``runs/bench/NAME.json``) and its
figures beside it, named after it (``FILE.md``, ``FILE.png``); a benchmark that trains or generates what it
measures keeps those runs in ``--work DIR`` (default ``runs/bench/NAME``), where a later run reuses them;
``--no-progress`` turns off its progress bars. At the end it prints its summary table and the files it
wrote. Nothing here imports torch: ``masm --help`` builds every benchmark's parser.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Under runs/, which holds every run a masm command writes by default (and git ignores).
DEFAULT_DIR = Path("runs") / "bench"


def json_file(text: str) -> Path:
    """``--out``'s type: a ``.json`` file name (a folder, as ``quality`` once took, is refused at once)."""
    path = Path(text)
    if path.suffix != ".json":
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE.json (reused runs go to --work DIR)")
    return path


def add_common_arguments(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    figures: str | None = None,
    work: str | None = None,
    progress: str | None = None,
) -> None:
    """``--out FILE.json`` (``figures``: what the benchmark writes beside it), ``--work DIR`` when ``work``
    says what the benchmark keeps there, and ``--no-progress`` (``progress``: what it silences; by default
    the benchmark shows no bars)."""
    parser.add_argument(
        "--out",
        type=json_file,
        default=DEFAULT_DIR / f"{name}.json",
        metavar="FILE.json",
        help="JSON file of the results" + (f"; {figures}" if figures else ""),
    )
    if work:
        parser.add_argument("--work", type=Path, default=DEFAULT_DIR / name, metavar="DIR", help=work)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help=progress or "no progress bars (this benchmark shows none; the switch is there for every one)",
    )


def beside(out: Path, suffix: str) -> Path:
    """The figure ``suffix`` (``.md``, ``.png``) of the result file ``out``, its folder made."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_suffix(suffix)


def write_result(out: Path, result: dict, summary: str, figures: tuple[Path, ...] = ()) -> None:
    """Write ``result`` to ``out`` as JSON, then print ``summary`` and the files written (``figures``:
    those the benchmark wrote beside ``out``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(summary)
    print("wrote " + ", ".join(str(path) for path in (out, *figures)))


def machine_info() -> dict:
    """Where a benchmark ran: core count, platform, torch version and GPU if any."""
    import platform

    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info

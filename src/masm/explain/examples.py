"""Where people look anyway: the evaluation's most telling frames, each with its explanation map.

Per test set, from the scored frames: the highest-scoring fakes (what the detector is surest of), the
highest-scoring reals (false alarms) and the lowest-scoring fakes (misses). One sheet per test set,
``examples-NAME.png``, rows in that order. The maps are computed for these few frames only, after scoring,
so an evaluation without a report folder costs nothing more. :func:`sheet_writer` is the hook that
:func:`masm.evaluation.evaluate.evaluate_detector` calls to have them drawn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the hook's type only: this module stays light to import
    from ..evaluation.evaluate import ExampleSheets

GROUPS = ("highest-scoring fakes", "false alarms (highest-scoring reals)", "misses (lowest-scoring fakes)")


def pick_examples(rows: Sequence[tuple], count: int) -> dict[str, list[tuple]]:
    """``rows`` of ``(path, video, label, score)`` -> ``{group: rows}`` with up to ``count`` rows each."""
    fakes = sorted((r for r in rows if int(r[2]) == 1), key=lambda r: -r[3])
    reals = sorted((r for r in rows if int(r[2]) == 0), key=lambda r: -r[3])
    return dict(zip(GROUPS, (fakes[:count], reals[:count], fakes[::-1][:count])))


def write_example_sheets(
    detector, predictions: Mapping[str, Sequence[tuple]], out_dir: str | Path, count: int = 4
) -> dict[str, dict]:
    """One example sheet per test set in ``out_dir``; ``{name: {"sheet": file name, group: [{path, score}]}}``.

    A frame that cannot be read again is left out of its sheet (it was scored, so this is rare).
    """
    from masm.data.images import load_rgb
    from masm.errors import DataError

    from .maps import explain
    from .render import example_sheet

    out_dir = Path(out_dir)
    written: dict[str, dict] = {}
    for name, rows in predictions.items():
        groups = pick_examples(rows, count)
        chosen = {row[0]: row for group in groups.values() for row in group}
        images = {}
        for path in chosen:
            try:
                images[path] = load_rgb(str(path))
            except DataError:
                continue
        paths = list(images)
        maps = dict(zip(paths, explain(detector, [images[p] for p in paths]))) if paths else {}
        sheet_rows = {
            group: [
                (images[r[0]], maps[r[0]], f"{Path(str(r[0])).name[:24]}\nscore {r[3]:.3f}")
                for r in group_rows
                if r[0] in images
            ]
            for group, group_rows in groups.items()
        }
        file_name = f"examples-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        example_sheet(out_dir / file_name, sheet_rows, title=f"{name}: where the detector looks")
        written[name] = {"sheet": file_name}
        written[name].update(
            {
                group: [{"path": str(r[0]), "score": float(r[3])} for r in rows_]
                for group, rows_ in groups.items()
            }
        )
    return written


def sheet_writer(count: int = 4) -> ExampleSheets | None:
    """The evaluation's example-sheet hook: ``count`` frames per group, or None (no sheets) below 1."""
    return partial(write_example_sheets, count=count) if count > 0 else None

"""Markdown tables of numbers, as every report and benchmark summary prints them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A Markdown table; floats get 4 decimals, ``None`` reads "n/a", ``|`` in a cell is escaped."""
    lines = [table_row(headers), "|" + "|".join(" --- " for _ in headers) + "|"]
    for number, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"table row {number} has {len(row)} cells for {len(headers)} headers")
        lines.append(table_row(row))
    return "\n".join(lines) + "\n"


def table_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")

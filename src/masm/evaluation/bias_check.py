"""The format-bias check: how far a detector's numbers move when every image is re-encoded the same way.

A detector that learned the file format instead of the generator (GenImage: JPEG reals, PNG fakes) loses
what it had as soon as reals and fakes share a format. ``masm eval --bias-check`` rescores every test set
with each image re-encoded (:class:`masm.data.reencode.Reencoder`, JPEG quality 95 unless told) after
decoding and before the model's transform, and reports, per test set, each metric as evaluated, re-encoded
and the difference (re-encoded minus as evaluated), also per generator when the frames name generators.
A large move says the format, not the image, carried the decision: checked, not assumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .generators import GENERATOR_METRICS
from .report_table import format_table

#: Frame-level metrics compared: ranking (AUC, AP) and decisions (accuracy, on reals and fakes apart).
BIAS_METRICS = ("auc", "ap", "acc", "acc_real", "acc_fake")


def _difference(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else float(after) - float(before)


def compare(before: Mapping[str, Any], after: Mapping[str, Any], metrics: tuple[str, ...]) -> dict[str, dict]:
    """``{"as_evaluated": {metric}, "reencoded": {metric}, "delta": {metric: reencoded - as evaluated}}``."""
    return {
        "as_evaluated": {m: before.get(m) for m in metrics},
        "reencoded": {m: after.get(m) for m in metrics},
        "delta": {m: _difference(before.get(m), after.get(m)) for m in metrics},
    }


def bias_check_entry(clean: Mapping[str, Any], reencoded: Mapping[str, Any]) -> dict[str, Any]:
    """One test set: its frame metrics compared, and per generator (and their mean) when both have them."""
    entry: dict[str, Any] = {"frame": compare(clean["frame"], reencoded["frame"], BIAS_METRICS)}
    if "generators" in clean and "generators" in reencoded:
        before, after = clean["generators"]["per_generator"], reencoded["generators"]["per_generator"]
        entry["generators"] = {
            name: compare(before[name], after.get(name, {}), GENERATOR_METRICS) for name in before
        }
        entry["generators_mean"] = compare(
            clean["generators"]["mean"], reencoded["generators"]["mean"], GENERATOR_METRICS
        )
    return entry


def bias_check_report(
    clean: Mapping[str, Mapping], reencoded: Mapping[str, Mapping], reencoding: Mapping[str, Any]
) -> dict[str, Any]:
    """report.json's ``"bias_check"``: the re-encoding (``format``, ``quality``) and an entry per test set."""
    return {
        **dict(reencoding),
        "datasets": {
            name: bias_check_entry(clean[name], reencoded[name]) for name in clean if name in reencoded
        },
    }


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _row(label: str, compared: Mapping[str, Mapping]) -> list[Any]:
    """AUC as evaluated and re-encoded, then the move of every metric (re-encoded minus as evaluated)."""
    moves = [_signed(compared["delta"][metric]) for metric in BIAS_METRICS]  # per generator: the same five
    return [label, compared["as_evaluated"]["auc"], compared["reencoded"]["auc"], *moves]


TABLE_HEADERS = ["Test set", "AUC", "AUC re-encoded"]
TABLE_HEADERS += ["Δ AUC", "Δ AP", "Δ ACC", "Δ ACC real", "Δ ACC fake"]


def bias_check_table(bias: Mapping[str, Any]) -> str:
    """Markdown table: per test set, then per generator and their mean, the AUC before and after the
    re-encoding and how far each metric moved (the full numbers are in report.json)."""
    rows = []
    for name, entry in bias["datasets"].items():
        rows.append(_row(name, entry["frame"]))
        for generator, compared in entry.get("generators", {}).items():
            rows.append(_row(f"{name} / {generator}", compared))
        if "generators_mean" in entry:
            rows.append(_row(f"{name} / mean over generators", entry["generators_mean"]))
    return format_table(rows, TABLE_HEADERS)


def bias_check_section(bias: Mapping[str, Any] | None) -> str:
    """report.md's section of the format-bias check ("" without one)."""
    if not bias:
        return ""
    how = f"{str(bias['format']).upper()} quality {bias['quality']}"
    return "\n".join(
        [
            "## Format bias check\n",
            f"Every image re-encoded as {how} after decoding, before the model's transform, then scored "
            "again. Δ = re-encoded minus as evaluated (all numbers in report.json); a large move means the "
            "file format, not the image, carried the decision.\n",
            bias_check_table(bias),
        ]
    )

"""Evaluation and robustness reports: JSON for machines, Markdown for people, PNG figures, a CSV of scores.

An evaluation report holds, per test set, the :func:`~masm.evaluation.metrics.evaluate_scores` result and
the mean over test sets, with the caller's ``meta`` (seed, checkpoint, resolved config, parity flag, ...)
saved beside the numbers, as the protocol asks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MasmError
from .bias_check import bias_check_section
from .deployment_report import deployment_section, write_log_roc
from .generators import generators_section
from .metrics import mean_over_datasets, video_scores
from .plots import plot_robustness, plot_roc, robustness_means
from .report_table import cell as _cell
from .report_table import format_table

PARITY_NOTICE = "DeepfakeBench parity mode: first-N frame sampling and parent-folder video keys; not the project's protocol"

#: Header of ``predictions.csv``, one row per scored frame.
PREDICTION_COLUMNS = ("dataset", "path", "video", "label", "score")

#: Meta entries that are too large for the Markdown summary (they stay in report.json).
_BULKY_META = ("config",)


def _jsonable(value: Any) -> Any:
    """Plain JSON types from dataclasses, paths, numpy values, tuples; NaN becomes null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_eval_report(
    out_dir: str | Path,
    datasets: Mapping[str, Mapping],
    predictions: Mapping[str, Sequence[tuple[str, str, int, float]]],
    meta: Mapping[str, Any],
    examples: Mapping[str, Mapping] | None = None,
    bias_check: Mapping[str, Any] | None = None,
) -> Path:
    """Write report.json, report.md, roc.png and predictions.csv into ``out_dir``; return report.json's path.

    ``datasets`` maps each test set to its :func:`~masm.evaluation.metrics.evaluate_scores` result;
    ``predictions`` maps it to ``(path, video, label, score)`` per scored frame (for the CSV and the ROC
    curves). report.json is ``{"meta": meta, "datasets": {name: {"frame", "video", "skipped"[, "families"]}},
    "mean": mean_over_datasets(datasets)}``. ``meta["parity"]`` true adds the parity-mode notice to report.md.
    ``examples`` (:func:`masm.explain.examples.write_example_sheets`' result) adds ``"examples"`` to
    report.json and the sheets to report.md. A test set whose result holds ``"generators"`` gets its
    per-generator table; ``bias_check`` (:func:`~masm.evaluation.bias_check.bias_check_report`' result)
    adds ``"bias_check"`` to report.json and its section to report.md.
    """
    if not datasets:
        raise MasmError(f"no evaluated datasets to report in {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": dict(meta), "datasets": dict(datasets), "mean": mean_over_datasets(datasets)}
    if examples:
        report["examples"] = dict(examples)
    if bias_check:
        report["bias_check"] = dict(bias_check)
    json_path = out / "report.json"
    _write_json(json_path, report)
    (out / "report.md").write_text(_eval_markdown(report), encoding="utf-8")
    _write_predictions_csv(out / "predictions.csv", predictions)
    _write_roc(out / "roc.png", predictions)
    write_log_roc(out / "roc-log.png", predictions, datasets)
    return json_path


def _write_predictions_csv(path: Path, predictions: Mapping[str, Sequence[tuple]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for name, rows in predictions.items():
            for row in rows:
                if len(row) != 4:
                    raise MasmError(
                        f"prediction rows of {name!r} must be (path, video, label, score), got {row!r}"
                    )
                frame_path, video, label, score = row
                writer.writerow([name, str(frame_path), str(video), int(label), repr(float(score))])


def _write_roc(path: Path, predictions: Mapping[str, Sequence[tuple]]) -> None:
    frame_curves: dict[str, tuple] = {}
    video_curves: dict[str, tuple] = {}
    for name, rows in predictions.items():
        if not rows:
            continue
        _, videos, labels, scores = zip(*rows)
        frame_curves[name] = (np.asarray(labels), np.asarray(scores, dtype=np.float64))
        _, v_labels, v_scores = video_scores(videos, labels, scores)
        video_curves[name] = (v_labels, v_scores)
    if frame_curves:
        plot_roc(frame_curves, path, video_curves=video_curves)


def _eval_markdown(report: Mapping[str, Any]) -> str:
    meta, datasets, mean = report["meta"], report["datasets"], report["mean"]
    parts = ["# Evaluation report\n"]
    if meta.get("parity"):
        parts.append(f"> **{PARITY_NOTICE}.**\n")
    meta_lines = [f"- {key}: {_cell(value)}" for key, value in meta.items() if key not in _BULKY_META]
    meta_lines += [f"- {key}: see report.json" for key in _BULKY_META if key in meta]
    if meta_lines:
        parts.append("\n".join(meta_lines) + "\n")
    parts.append("## Frame level\n")
    if any(result.get("families") for result in datasets.values()):
        parts.append(
            "Rows DATASET / FAMILY: the fakes of that forgery family against all of the test set's reals "
            "(their real count is the test set's). The mean row averages the test sets' own rows only.\n"
        )
    parts.append(_level_table(datasets, mean, "frame", "frames"))
    parts.append("## Video level (mean frame score per video)\n")
    parts.append(_level_table(datasets, mean, "video", "videos"))
    for section in (generators_section(datasets), bias_check_section(report.get("bias_check"))):
        if section:
            parts.append(section)
    deployment = deployment_section(datasets)
    if deployment:
        parts.append(deployment)
        parts.append("![ROC, log false-positive rate, stored operating points marked](roc-log.png)\n")
    if report.get("examples"):
        parts.append("## Where the detector looks\n")
        parts.append(
            "Per test set: the highest-scoring fakes, the highest-scoring reals (false alarms) and the "
            "lowest-scoring fakes (misses), each with its explanation map (red: evidence for fake).\n"
        )
        parts.append(
            "\n".join(f"![{name}]({entry['sheet']})" for name, entry in report["examples"].items()) + "\n"
        )
    notes = _notes(datasets)
    if notes:
        parts.append("## Notes\n")
        parts.append("\n".join(notes) + "\n")
    return "\n".join(parts)


def mean_label(mean: Mapping, level: str) -> str:
    """The mean row's name: what it averages, e.g. "mean (AUC over 2 of 2)" (one-class sets have no AUC)."""
    return f"mean (AUC over {mean[level]['n_contributing']['auc']} of {mean['n_datasets']})"


def _level_table(datasets: Mapping[str, Mapping], mean: Mapping, level: str, unit: str) -> str:
    """Per test set its pooled row, then a row per family of its fakes (that family against all reals);
    the mean row averages the pooled rows' AUC, AP, EER and ACC only, the total row adds up their counts."""
    headers = ["Dataset", "AUC", "AP", "EER", "ACC", "ACC real", "ACC fake", f"Real {unit}", f"Fake {unit}"]
    if level == "frame":
        headers.append("Skipped")
    rows = []
    for name, result in datasets.items():
        row = [name, *_metric_cells(result[level])]
        if level == "frame":
            row.append(result.get("skipped", {}).get("count", 0))
        rows.append(row)
        for family, family_result in result.get("families", {}).items():
            cells = _metric_cells(family_result[level])
            cells[-2] = ""  # the reals are the test set's, counted in its row
            rows.append([f"{name} / {family}", *cells] + ([""] if level == "frame" else []))
    means = mean[level]
    row = [mean_label(mean, level), means["auc"], means["ap"], means["eer"], means["acc"], "", "", "", ""]
    total = ["total", "", "", "", "", "", ""]
    total += [
        sum(r[level]["n_real"] for r in datasets.values()),
        sum(r[level]["n_fake"] for r in datasets.values()),
    ]
    if level == "frame":
        row.append("")
        total.append(sum(r.get("skipped", {}).get("count", 0) for r in datasets.values()))
    rows += [row, total]
    return format_table(rows, headers)


def _metric_cells(m: Mapping) -> list:
    return [m["auc"], m["ap"], m["eer"], m["acc"], m["acc_real"], m["acc_fake"], m["n_real"], m["n_fake"]]


def _notes(datasets: Mapping[str, Mapping]) -> list[str]:
    notes = []
    for name, result in datasets.items():
        for level in ("frame", "video"):
            if "note" in result[level]:
                notes.append(f"- {name}, {level} level: {result[level]['note']}")
        skipped = result.get("skipped") or {}
        if skipped.get("count"):
            reasons = ", ".join(f"{reason} ({count})" for reason, count in skipped["reasons"].items())
            example = skipped["examples"][0]["path"] if skipped.get("examples") else None
            line = f"- {name}: frames skipped: {skipped['count']}: {reasons}"
            notes.append(line + (f"; e.g. {example}" if example else ""))
    return notes


def _check_robustness_table(table: Mapping) -> dict[str, dict[int, dict[str, float | None]]]:
    if not table:
        raise MasmError("no robustness results to report")
    checked: dict[str, dict[int, dict[str, float | None]]] = {}
    for name, levels in table.items():
        checked[name] = {}
        for level, aucs in levels.items():
            try:
                level_int = int(level)
            except (TypeError, ValueError) as err:
                raise MasmError(f"robustness level {level!r} of {name!r} is not an integer") from err
            checked[name][level_int] = {str(d): (None if a is None else float(a)) for d, a in aucs.items()}
        checked[name] = dict(sorted(checked[name].items()))
    return checked


def write_robustness_report(
    out_dir: str | Path, table: Mapping[str, Mapping[int, Mapping[str, float | None]]]
) -> None:
    """Write robustness.json, robustness.md and robustness.png into ``out_dir``.

    ``table`` is ``{perturbation: {level: {dataset: auc}}}`` with level 0 = clean. robustness.json is
    ``{"table": table, "mean": {perturbation: {level: mean AUC over datasets}}}`` (levels as strings).
    """
    checked = _check_robustness_table(table)
    means = robustness_means(checked)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "robustness.json", {"table": checked, "mean": means})
    (out / "robustness.md").write_text(_robustness_markdown(checked, means), encoding="utf-8")
    plot_robustness(checked, out / "robustness.png")


def _robustness_markdown(table: dict[str, dict[int, dict]], means: dict[str, dict[int, Any]]) -> str:
    levels = sorted({level for per_level in table.values() for level in per_level})
    level_headers = [f"level {lv}" + (" (clean)" if lv == 0 else "") for lv in levels]
    mean_rows = [[name, *(means[name].get(lv) for lv in levels)] for name in table]
    datasets: list[str] = []
    for per_level in table.values():
        for aucs in per_level.values():
            datasets.extend(d for d in aucs if d not in datasets)
    detail_rows = [
        [name, level, *(aucs.get(d) for d in datasets), means[name][level]]
        for name, per_level in table.items()
        for level, aucs in per_level.items()
    ]
    return "\n".join(
        [
            "# Robustness report\n",
            "## AUC, mean over datasets\n",
            format_table(mean_rows, ["Perturbation", *level_headers]),
            "## AUC per dataset\n",
            format_table(detail_rows, ["Perturbation", "Level", *datasets, "mean"]),
        ]
    )

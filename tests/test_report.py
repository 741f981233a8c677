"""Report files are written and read back; figures are drawn."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from masm.errors import MasmError
from masm.evaluation import (
    evaluate_scores,
    format_table,
    plot_mask_heatmap,
    plot_roc,
    write_eval_report,
    write_robustness_report,
)
from masm.evaluation.plots import read_mask_log
from masm.evaluation.report import PARITY_NOTICE, PREDICTION_COLUMNS


@dataclass
class _Config:
    lr: float = 1e-4
    root: Path = Path("/data")


def _predictions(seed: int, n_videos: int, one_class: bool = False):
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_videos):
        label = 1 if one_class else v % 2
        for f in range(4):
            video = f"DS{seed}/{'fake' if label else 'real'}/{v:03d}"
            rows.append((f"{video}/{f:03d}.png", video, label, float(rng.random() * 0.6 + 0.4 * label)))
    return rows


def _evaluate(rows, skipped=None):
    paths, videos, labels, scores = zip(*rows)
    return evaluate_scores(paths, videos, labels, scores, skipped=skipped)


@pytest.fixture
def eval_dir(tmp_path):
    predictions = {"Celeb-DF-v2": _predictions(1, 6), "DFDCP": _predictions(2, 4, one_class=True)}
    datasets = {
        "Celeb-DF-v2": _evaluate(predictions["Celeb-DF-v2"], skipped=[("x/0.png", "missing file")]),
        "DFDCP": _evaluate(predictions["DFDCP"]),
    }
    meta = {"seed": 7, "checkpoint": Path("runs/a/best"), "config": _Config(), "parity": True}
    path = write_eval_report(tmp_path / "eval", datasets, predictions, meta)
    return path, predictions, datasets


def test_report_json(eval_dir):
    path, _, datasets = eval_dir
    assert path.name == "report.json"
    report = json.loads(path.read_text())
    assert set(report) == {"meta", "datasets", "mean"}
    assert report["meta"] == {
        "seed": 7,
        "checkpoint": "runs/a/best",
        "config": {"lr": 1e-4, "root": "/data"},
        "parity": True,
    }
    assert set(report["datasets"]) == {"Celeb-DF-v2", "DFDCP"}
    for result in report["datasets"].values():
        assert set(result) == {"frame", "video", "skipped"}
    assert report["datasets"]["Celeb-DF-v2"]["frame"]["auc"] == pytest.approx(
        datasets["Celeb-DF-v2"]["frame"]["auc"]
    )
    assert report["datasets"]["DFDCP"]["frame"]["auc"] is None
    assert report["mean"]["frame"]["n_contributing"]["auc"] == 1
    assert report["datasets"]["Celeb-DF-v2"]["skipped"]["reasons"] == {"missing file": 1}


def test_report_markdown(eval_dir):
    path, _, _ = eval_dir
    text = (path.parent / "report.md").read_text()
    assert PARITY_NOTICE in text
    assert "## Frame level" in text and "## Video level" in text
    assert text.count("| Celeb-DF-v2 |") == 2 and text.count("| mean (AUC over 1 of 2) |") == 2
    assert "only fake frames (n=16): AUC undefined" in text
    assert "missing file (1)" in text
    assert "- seed: 7" in text and "- config: see report.json" in text


def test_no_parity_line_without_parity(tmp_path):
    rows = _predictions(3, 4)
    write_eval_report(tmp_path, {"X": _evaluate(rows)}, {"X": rows}, {"seed": 0, "parity": False})
    assert "parity" not in (tmp_path / "report.md").read_text().split("- seed")[0]


def test_predictions_csv_round_trip(eval_dir):
    path, predictions, _ = eval_dir
    with (path.parent / "predictions.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert (
            tuple(reader.fieldnames) == PREDICTION_COLUMNS == ("dataset", "path", "video", "label", "score")
        )
        rows = list(reader)
    expected = [(name, *row) for name, rows_ in predictions.items() for row in rows_]
    assert len(rows) == len(expected)
    for got, (name, frame_path, video, label, score) in zip(rows, expected):
        assert (got["dataset"], got["path"], got["video"], int(got["label"])) == (
            name,
            frame_path,
            video,
            label,
        )
        assert float(got["score"]) == score


def test_roc_png(eval_dir):
    path, _, _ = eval_dir
    png = path.parent / "roc.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_report_is_an_error(tmp_path):
    with pytest.raises(MasmError, match="no evaluated datasets"):
        write_eval_report(tmp_path, {}, {}, {})


def test_robustness_report(tmp_path):
    table = {
        "jpeg": {0: {"A": 0.9, "B": 0.8}, 1: {"A": 0.85, "B": 0.7}, 2: {"A": 0.7, "B": None}},
        "blur": {0: {"A": 0.9, "B": 0.8}, 2: {"A": 0.6, "B": 0.6}},
    }
    write_robustness_report(tmp_path, table)
    data = json.loads((tmp_path / "robustness.json").read_text())
    assert data["table"]["jpeg"]["1"] == {"A": 0.85, "B": 0.7}
    assert data["mean"]["jpeg"]["0"] == pytest.approx(0.85)
    assert data["mean"]["jpeg"]["2"] == pytest.approx(0.7)
    text = (tmp_path / "robustness.md").read_text()
    assert "| Perturbation | level 0 (clean) | level 1 | level 2 |" in text
    assert "| blur | 0.8500 | n/a | 0.6000 |" in text
    assert "| jpeg | 2 | 0.7000 | n/a | 0.7000 |" in text
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    with pytest.raises(MasmError, match="not an integer"):
        write_robustness_report(tmp_path, {"jpeg": {"high": {"A": 0.5}}})


def test_format_table():
    text = format_table([["a|b", 0.123456, None, 3]], ["name", "auc", "ap", "n"])
    assert text.splitlines() == [
        "| name | auc | ap | n |",
        "| --- | --- | --- | --- |",
        "| a\\|b | 0.1235 | n/a | 3 |",
    ]
    with pytest.raises(ValueError, match="2 cells for 4 headers"):
        format_table([[1, 2]], ["a", "b", "c", "d"])


def _write_mask_log(path: Path) -> None:
    layers = [f"blocks.{i}.attn.qkv" for i in range(4)]
    lines = []
    for step in (100, 200, 300):
        rho = [[0.1 * i + 0.01 * step / 100, 0.5] for i in range(4)]
        mask = [[1, int(i % 2 == 0)] for i in range(4)]
        lines.append(json.dumps({"step": step, "layers": layers, "rho": rho, "mask": mask}))
    path.write_text("\n".join(lines) + "\n\n")


def test_mask_heatmap(tmp_path):
    log = tmp_path / "masks.jsonl"
    _write_mask_log(log)
    steps, layers, share, rho = read_mask_log(log)
    assert steps == [100, 200, 300] and len(layers) == 4
    np.testing.assert_allclose(share[:, 0], [1.0, 0.5, 1.0, 0.5])
    np.testing.assert_allclose(rho[1], [(0.11 + 0.5) / 2, (0.12 + 0.5) / 2, (0.13 + 0.5) / 2])
    out = plot_mask_heatmap(log, tmp_path / "fig" / "masks.png")
    assert out.stat().st_size > 1000


def test_mask_log_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "layers": ["a"], "rho": [[0.1]], "mask": [[1]]}\n{oops\n')
    with pytest.raises(MasmError, match="bad.jsonl:2: not valid JSON"):
        read_mask_log(bad)
    bad.write_text('{"step": 1, "layers": ["a", "b"], "rho": [[0.1]], "mask": [[1], [0]]}\n')
    with pytest.raises(MasmError, match="2 layers but 1 rho rows"):
        read_mask_log(bad)
    bad.write_text("\n")
    with pytest.raises(MasmError, match="no entries"):
        read_mask_log(bad)


def test_plot_roc_handles_one_class(tmp_path):
    out = plot_roc(
        {"two": ([0, 1, 0, 1], [0.1, 0.8, 0.4, 0.3]), "one": ([1, 1], [0.2, 0.9])}, tmp_path / "r.png"
    )
    assert out.stat().st_size > 1000


def test_family_rows_and_a_mean_row_that_averages_only_what_it_averages(tmp_path):
    rows = _predictions(4, 8)
    paths, videos, labels, scores = zip(*rows)
    families = [("gan" if int(v[-1]) % 4 == 1 else "swap") if y else None for v, y in zip(videos, labels)]
    result = evaluate_scores(paths, videos, labels, scores, families=families)
    assert set(result["families"]) == {"gan", "swap"}
    gan = result["families"]["gan"]["frame"]
    assert (gan["n_real"], gan["n_fake"]) == (result["frame"]["n_real"], 8)
    write_eval_report(tmp_path, {"X": result}, {"X": rows}, {"seed": 0})
    text = (tmp_path / "report.md").read_text()
    assert text.count("| X / gan |") == 2 and text.count("| X / swap |") == 2
    frame_table = text.split("## Frame level")[1].split("## Video level")[0]
    mean = next(line for line in frame_table.splitlines() if line.startswith("| mean"))
    total = next(line for line in frame_table.splitlines() if line.startswith("| total"))
    assert mean.endswith("|  |  |  |  |  |") and "n/a" not in mean  # ACC real/fake and counts: not averaged
    assert total.endswith(f"| {result['frame']['n_real']} | {result['frame']['n_fake']} | 0 |")

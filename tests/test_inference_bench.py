"""``masm bench detect`` on the tiny backbone: runs, prints the table, writes JSON."""

from __future__ import annotations

import argparse
import json

from masm.benchmarks import detect_speed


def test_detect_benchmark_runs_on_tiny_backbone(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    detect_speed.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--backbone", "tiny-clip", "--images", "4", "--batch-size", "2", "--explain", "--out", str(out)]
    )
    assert detect_speed.run(args) == 0
    result = json.loads(out.read_text())
    assert result["merged"] and result["detect_images_per_s"] > 0 and result["plain_forward_images_per_s"] > 0
    assert result["ratio"] == result["detect_images_per_s"] / result["plain_forward_images_per_s"]
    assert result["explain_images_per_s"] > 0 and len(result["explain_runs"]) == result["repeats"]
    printed = capsys.readouterr().out
    assert "ratio detect / plain" in printed and "ratio detect --explain / plain" in printed

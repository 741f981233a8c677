"""``masm bench data``: the training loader's frames/s per worker and the workers a GPU needs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from data_fixtures import make_dfb_fixture
from masm.benchmarks import data_speed
from masm.cli.main import main
from masm.errors import MasmError

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    data_speed.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "batch,step_ms,rate,expected",
    [
        (32, 50.0, 100.0, 7),  # 32 / (0.05 * 100) = 6.4
        (32, 40.0, 100.0, 8),  # exactly 8 (0.04 * 100 is 4.000000000000001 in floats)
        (32, 57.2, 47.2, 12),  # 11.85
        (8, 1000.0, 100.0, 1),  # 0.08: one worker still
        (30, 100.0, 10.0, 30),
    ],
)
def test_workers_needed_formula(batch, step_ms, rate, expected):
    assert data_speed.workers_needed(batch, step_ms, rate) == expected


def test_workers_needed_reaches_the_json_for_known_rates(tmp_path, monkeypatch, capsys):
    rates = {"crops": 100.0, "pseudo-fakes": 40.0}

    def fake_time_kind(kind, records, args):
        rate = rates[kind]
        return {"frames": len(records), "frames_per_s_per_worker": rate, "ms_per_frame": 1000 / rate,
                "runs": [rate], "failed": 0, "fake_share": 0.5, "workers": {}}  # fmt: skip

    monkeypatch.setattr(data_speed, "time_kind", fake_time_kind)
    fixture = make_dfb_fixture(tmp_path / "dfb")  # its train split: 8 real frames
    out = tmp_path / "data.json"
    args = parse(
        "--data", str(fixture["json"]), "--data-root", str(fixture["data_root"]), "--frames", "3",
        "--step-ms", "50,20", "--batch-size", "32", "--out", str(out),
    )  # fmt: skip
    assert data_speed.run(args) == 0
    result = json.loads(out.read_text())
    assert result["spec"] == f"dfb:{fixture['json']}@train" and result["crop_size"] is None
    assert {kind: r["frames"] for kind, r in result["kinds"].items()} == {"crops": 3, "pseudo-fakes": 3}
    # 32 / (0.05 * 100) = 6.4 -> 7; 32 / (0.05 * 40) = 16; 32 / (0.02 * 100) = 16; 32 / (0.02 * 40) = 40
    assert result["workers_needed"] == [
        {"step_ms": 50.0, "crops": 7, "pseudo-fakes": 16},
        {"step_ms": 20.0, "crops": 16, "pseudo-fakes": 40},
    ]
    table = capsys.readouterr().out
    assert "workers needed per GPU" in table and " 40" in table


def test_bench_data_times_the_training_loader(tmp_path, capsys):
    pytest.importorskip("dlib")  # the generated crops are aligned faces; pseudo-fakes follow landmarks
    out = tmp_path / "nested" / "data.json"
    args = parse(
        "--frames", "4", "--repeats", "2", "--size", "96", "--input-size", "64", "--loader-batch", "2",
        "--workers", "1", "--step-ms", "57.2,24", "--batch-size", "16", "--out", str(out),
    )  # fmt: skip
    assert data_speed.run(args) == 0
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == {"crops", "pseudo-fakes"}
    assert result["crop_size"] == 96 and result["input_size"] == 64 and result["batch_size"] == 16
    assert result["mean_file_bytes"] > 0 and result["threads"] == 1
    assert result["pseudo_fakes"] == data_speed.SBI_PSEUDO_FAKES
    for kind, r in result["kinds"].items():
        assert r["frames"] == 4 and r["failed"] == 0, kind
        assert len(r["runs"]) == 2 and all(x > 0 for x in r["runs"])
        assert r["frames_per_s_per_worker"] == pytest.approx(
            sorted(r["runs"])[0] / 2 + sorted(r["runs"])[1] / 2
        )
        assert r["ms_per_frame"] == pytest.approx(1000 / r["frames_per_s_per_worker"])
        assert set(r["workers"]) == {"1"} and r["workers"]["1"]["frames_per_s"] > 0
    assert [row["step_ms"] for row in result["workers_needed"]] == [57.2, 24.0]
    for row in result["workers_needed"]:
        for kind, r in result["kinds"].items():
            expected = max(1, math.ceil(16 / (row["step_ms"] / 1000 * r["frames_per_s_per_worker"]) - 1e-9))
            assert row[kind] == expected
    assert "workers needed per GPU" in capsys.readouterr().out


def test_generated_data_is_a_deepfakebench_index(tmp_path):
    pytest.importorskip("dlib")
    index = data_speed.make_dataset(tmp_path, 3, 9, 48)
    records, spec = data_speed.open_records(str(index), None)
    assert spec == f"dfb:{index}@train"
    assert sorted(r.label for r in records) == [0] * 3 + [1] * 9
    assert len({r.video for r in records}) == 3  # 8 frames per video: 1 real video, 2 fake ones
    data = json.loads(index.read_text())
    assert set(data["BenchFaces"]) == {"real", "fake"} and set(data["BenchFaces"]["real"]) == {"train"}


def test_pseudo_fake_settings_are_the_sbi_configs():
    from masm.data.pseudo_fakes import PseudoFakeConfig
    from masm.training.config import load_train_config

    config = load_train_config(ROOT / "configs" / "sbi" / "clip-vit-l14-masm.yaml")
    assert config.data.pseudo_fakes == PseudoFakeConfig(**data_speed.SBI_PSEUDO_FAKES)


@pytest.mark.parametrize("kind", ["missing", "empty", "missing-json"])
def test_bad_data_is_one_line_naming_the_path(tmp_path, kind, capsys):
    path = {"missing": tmp_path / "nowhere", "empty": tmp_path, "missing-json": tmp_path / "x.json"}[kind]
    with pytest.raises(MasmError, match=str(path)):
        data_speed.run(parse("--data", str(path), "--frames", "2"))
    assert main(["bench", "data", "--data", str(path), "--frames", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_bad_options_are_errors():
    with pytest.raises(MasmError, match="--kinds"):
        data_speed.run(parse("--kinds", "crops,videos"))
    with pytest.raises(MasmError, match="--step-ms"):
        data_speed.run(parse("--step-ms", "0"))
    with pytest.raises(MasmError, match="--workers"):
        data_speed.run(parse("--workers", "two"))

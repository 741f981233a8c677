"""Format alignment: every image re-encoded alike (data.align_format in training, masm eval --bias-check)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from masm.data.images import load_rgb
from masm.data.index import FrameRecord
from masm.data.reencode import Reencoder, format_aligner
from masm.data.transforms import build_transform
from masm.errors import ConfigError
from masm.evaluation.evaluate import evaluate_detector
from masm.models import Preprocessing
from masm.training.config import load_train_config
from masm.training.data import build_train_loader
from test_train_support import run_cli

PRE = Preprocessing(input_size=32, face_crop=None)


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def normalised(rgb: np.ndarray) -> torch.Tensor:
    mean = np.asarray(PRE.mean, np.float32) * 255.0
    std = np.asarray(PRE.std, np.float32) * 255.0
    return torch.from_numpy(((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_reencoder_is_a_jpeg_round_trip_and_checks_its_settings():
    rgb = noise(0)
    assert np.array_equal(Reencoder()(rgb), jpeg_round_trip(rgb, 95))
    assert np.array_equal(Reencoder("jpeg", 60)(rgb), jpeg_round_trip(rgb, 60))
    assert not np.array_equal(Reencoder()(rgb), rgb)
    assert format_aligner(None) is None and format_aligner("jpeg", 70) == Reencoder("jpeg", 70)
    with pytest.raises(ConfigError, match="quality must be an integer in 1..100, got 0"):
        Reencoder("jpeg", 0)
    with pytest.raises(ConfigError, match="unknown re-encoding format 'png' \\(known: jpeg\\)"):
        Reencoder("png")


def test_transform_reencodes_every_image_before_anything_else():
    transform = build_transform(PRE, train=False)
    assert transform.reencode is None  # as before unless asked
    transform.reencode = Reencoder("jpeg", 80)
    for seed in (1, 2, 3):
        rgb = noise(seed)
        assert torch.equal(transform(rgb), normalised(jpeg_round_trip(rgb, 80)))


def _write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.fromarray(noise(10 + i)).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def test_training_align_format_reencodes_every_training_image(tmp_path):
    paths = _write_images(tmp_path / "imgs", 4)
    records = [FrameRecord(str(p), i % 2, str(p)) for i, p in enumerate(paths)]
    overrides = ["data.augment.enabled=false", "data.num_workers=0", "data.batch_size=2"]
    plain = build_train_loader(load_train_config(None, overrides), records, PRE, 0, 1, torch.device("cpu"))
    assert plain.frames.transform.reencode is None
    assert torch.equal(plain.frames[0]["pixel_values"], normalised(load_rgb(paths[0])))
    aligned_config = load_train_config(
        None, overrides + ["data.align_format=jpeg", "data.align_format_quality=85"]
    )
    aligned = build_train_loader(aligned_config, records, PRE, 0, 1, torch.device("cpu"))
    assert aligned.frames.transform.reencode == Reencoder("jpeg", 85)
    for i, path in enumerate(paths):
        expected = normalised(jpeg_round_trip(load_rgb(path), 85))
        assert torch.equal(aligned.frames[i]["pixel_values"], expected)
    with pytest.raises(ConfigError, match="data.align_format_quality: value 101 is out of range"):
        load_train_config(None, ["data.align_format=jpeg", "data.align_format_quality=101"])


class JpegTraceDetector(torch.nn.Module):
    """Scores an image by how much a JPEG re-encoding changes it: PNG noise changes a lot (fake), a decoded
    JPEG little (real). A detector that learned the file format, not the generator."""

    def __init__(self):
        super().__init__()
        self.preprocessing = PRE
        self.calibration = None
        self.probe = Reencoder()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(PRE.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(PRE.std).view(1, 3, 1, 1) * 255.0
        images = (pixels.float() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        change = [np.abs(img.astype(float) - self.probe(img).astype(float)).mean() for img in images.numpy()]
        z = (torch.tensor(change, dtype=torch.float32) - 20.0) / 4.0
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _genimage(root: Path, transform=None) -> Path:
    """Two generators; reals are JPEG files (ImageNet), fakes PNG; ``transform`` re-encodes as it writes."""
    for g, generator in enumerate(("ADM", "BigGAN")):
        for i in range(3):
            real, fake = noise(100 * g + i), noise(100 * g + 50 + i)
            real = jpeg_round_trip(real, 95)  # what the JPEG file decodes to
            for folder, rgb in (("nature", real), ("ai", fake)):
                path = root / generator / "val" / folder / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(transform(rgb) if transform else rgb).save(path)
    (root / "BigGAN" / "val" / "ai" / "broken.png").write_bytes(b"")  # fails to load: counted, both times
    return root


def test_bias_check_deltas_equal_the_difference_of_two_evaluations(tmp_path):
    detector = JpegTraceDetector()
    as_given = _genimage(tmp_path / "a" / "GenImage")
    reencoded = _genimage(tmp_path / "b" / "GenImage", Reencoder())  # the same images, re-encoded on disk
    common = dict(frames=1, num_workers=0, progress=False, device="cpu", batch_size=4)
    out = tmp_path / "report"
    result = evaluate_detector(
        detector, [f"genimage:{as_given}"], out_dir=out, bias_check=Reencoder(), **common
    )
    direct_result = evaluate_detector(detector, [f"genimage:{reencoded}"], **common)
    assert direct_result["bias_check"] is None  # only when asked for
    direct = direct_result["datasets"]["GenImage"]
    clean = result["datasets"]["GenImage"]
    assert clean["skipped"]["count"] == 1 and direct["skipped"]["count"] == 1
    bias = result["bias_check"]
    assert (bias["format"], bias["quality"]) == ("jpeg", 95)
    entry = bias["datasets"]["GenImage"]
    for metric in ("auc", "ap", "acc", "acc_real", "acc_fake"):
        assert entry["frame"]["as_evaluated"][metric] == clean["frame"][metric]
        assert entry["frame"]["reencoded"][metric] == direct["frame"][metric]
        assert entry["frame"]["delta"][metric] == direct["frame"][metric] - clean["frame"][metric]
    # the format carried the decision: every fake was caught, and none is once all are JPEGs
    assert clean["frame"]["acc_fake"] == 1.0 and direct["frame"]["acc_fake"] == 0.0
    assert entry["frame"]["delta"]["acc"] == -0.5
    for generator in ("ADM", "BigGAN"):
        compared = entry["generators"][generator]
        before = clean["generators"]["per_generator"][generator]
        after = direct["generators"]["per_generator"][generator]
        for metric in ("acc", "acc_real", "acc_fake", "ap", "auc"):
            assert compared["delta"][metric] == after[metric] - before[metric]
    mean_delta = entry["generators_mean"]["delta"]["acc"]
    assert mean_delta == direct["generators"]["mean"]["acc"] - clean["generators"]["mean"]["acc"]
    report = json.loads((out / "report.json").read_text())
    assert report["bias_check"]["datasets"]["GenImage"]["frame"]["delta"]["acc"] == -0.5
    assert "generators" in report["datasets"]["GenImage"]
    md = (out / "report.md").read_text()
    assert "## Format bias check" in md and "JPEG quality 95" in md
    assert "| GenImage | 1.0000 | 1.0000 | +0.0000 | +0.0000 | -0.5000 | +0.0000 | -1.0000 |" in md


def test_cli_bias_check_options_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    base = ["eval", str(tmp_path / "no-checkpoint"), "--data", f"genimage:{tmp_path}"]
    assert run_cli(base + ["--bias-check-quality", "90"], monkeypatch) != 0
    assert (
        "--bias-check-quality sets the quality of --bias-check: add --bias-check" in capsys.readouterr().err
    )
    assert run_cli(base + ["--bias-check", "--bias-check-quality", "0"], monkeypatch) != 0
    err = capsys.readouterr().err
    assert "quality must be an integer in 1..100, got 0" in err and "Traceback" not in err


def test_cli_eval_bias_check_on_a_checkpoint(tmp_path, monkeypatch, capsys):
    from masm.models import create_detector, save_checkpoint

    checkpoint = save_checkpoint(create_detector("tiny-clip", "masm", preprocessing=PRE), tmp_path / "ckpt")
    data = _genimage(tmp_path / "GenImage")
    argv = [
        "eval",
        str(checkpoint),
        "--data",
        f"genimage:{data}",
        "--bias-check",
        "--bias-check-quality",
        "90",
    ]
    argv += ["--workers", "0", "--examples", "0", "--no-progress", "--out", str(tmp_path / "out")]
    run_cli(argv, monkeypatch)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "format bias check (JPEG quality 90, delta = re-encoded - as evaluated)" in captured.out
    assert "## Per generator" in captured.out and "| mean over 2 generators |" in captured.out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["bias_check"]["quality"] == 90
    assert set(report["bias_check"]["datasets"]["GenImage"]["generators"]) == {"ADM", "BigGAN"}

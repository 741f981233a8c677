"""Transforms, robustness perturbations and the frame dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import write_png
from masm.data.dataset import FrameDataset, collate_frames
from masm.data.index import FrameRecord
from masm.data.perturb import PERTURBATIONS, apply_perturbation, parse_perturbation
from masm.data.transforms import AugmentConfig, build_transform
from masm.errors import ConfigError
from masm.models.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def face_image():
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[:256:2, 100:356:2])  # 128x128


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_perturbation_monotonic_and_deterministic(face_image, name):
    values = []
    for level in range(1, 6):
        out = apply_perturbation(face_image, name, level, seed=3)
        assert out.shape == face_image.shape and out.dtype == np.uint8
        assert np.array_equal(out, apply_perturbation(face_image, name, level, seed=3))
        values.append(psnr(face_image, out))
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_h264_odd_sizes():
    img = np.random.default_rng(0).integers(0, 255, (33, 17, 3), np.uint8)
    assert apply_perturbation(img, "h264", 1).shape == (33, 17, 3)


def test_noise_depends_on_seed(face_image):
    a = apply_perturbation(face_image, "noise", 2, seed=1)
    assert not np.array_equal(a, apply_perturbation(face_image, "noise", 2, seed=2))


def test_parse_perturbation():
    assert parse_perturbation("jpeg:3") == [("jpeg", 3)]
    assert parse_perturbation("blur") == [("blur", lv) for lv in range(1, 6)]
    assert len(parse_perturbation("all")) == 5 * len(PERTURBATIONS)
    assert parse_perturbation("none") == []
    with pytest.raises(ConfigError, match="unknown perturbation 'jpg'"):
        parse_perturbation("jpg:2")
    with pytest.raises(ConfigError, match="level"):
        parse_perturbation("jpeg:9")


def test_eval_transform_resizes_and_normalises(face_image):
    pre = Preprocessing(input_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = build_transform(pre, train=False)(face_image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    white = build_transform(pre, train=False)(np.full((10, 20, 3), 255, np.uint8))
    assert torch.allclose(white, torch.full_like(white, 2.0))  # (1 - 0.5) / 0.25
    red = build_transform(pre, train=False)(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1)))
    assert red[0].mean() > 0 > red[2].mean()  # channel 0 is R: RGB order kept


def test_train_transform_augments(face_image):
    pre = Preprocessing(input_size=32)
    cfg = AugmentConfig(hflip=1.0)
    outs = {build_transform(pre, train=True, augment=cfg)(face_image).sum().item() for _ in range(4)}
    assert len(outs) > 1
    plain = build_transform(pre, train=True, augment=AugmentConfig(enabled=False))
    assert torch.equal(plain(face_image), build_transform(pre, train=False)(face_image))


def test_perturbed_transform_seeded_per_path(face_image):
    t = build_transform(Preprocessing(input_size=32), train=False, perturbation=("noise", 3), seed=5)
    assert torch.equal(t(face_image, key="a.png"), t(face_image, key="a.png"))
    assert not torch.equal(t(face_image, key="a.png"), t(face_image, key="b.png"))
    with pytest.raises(ConfigError):
        build_transform(Preprocessing(), train=False, perturbation=("foo", 1))


def test_dataset_reports_failed_frames(tmp_path):
    good = write_png(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    records = [
        FrameRecord(str(good), 0, "v/a"),
        FrameRecord(str(broken), 1, "v/b"),
        FrameRecord(str(tmp_path / "gone.png"), 1, "v/c"),
    ]
    ds = FrameDataset(records, build_transform(Preprocessing(input_size=16), train=False))
    assert ds[1]["error"] and ds[1]["pixel_values"] is None and ds[1]["index"] == 1
    batch = collate_frames([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert batch["label"].tolist() == [0] and batch["index"].tolist() == [0]
    assert [p for p, _ in batch["failed"]] == [str(broken), str(tmp_path / "gone.png")]
    assert "broken.png" in batch["failed"][0][1]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_frames)
    assert len(next(iter(loader))["failed"]) == 2

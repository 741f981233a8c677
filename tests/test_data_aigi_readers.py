"""GenImage, UniversalFakeDetect / CNNDetection and Chameleon folders, read as distributed (open_dataset)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_png
from masm.data.spec import open_dataset
from masm.errors import DataError


def write_jpeg(path: Path, value: int = 100, size: int = 16) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="JPEG", quality=90)
    return path


def _images(folder: Path, n: int, *, jpeg: bool = False, ext: str | None = None) -> None:
    for i in range(n):
        if jpeg:
            write_jpeg(folder / f"ILSVRC2012_val_{i:08d}.{ext or 'JPEG'}", value=20 * i)
        else:
            write_png(folder / f"{i:03d}.{ext or 'png'}", value=20 * i)


@pytest.fixture
def genimage(tmp_path):
    """ADM one level deeper (as its archive unpacks), BigGAN directly; ImageNet reals as .JPEG files."""
    root = tmp_path / "GenImage"
    adm = root / "ADM" / "imagenet_ai_0508_adm"
    _images(adm / "val" / "ai", 2)
    _images(adm / "val" / "nature", 3, jpeg=True)
    _images(adm / "train" / "ai", 1)
    _images(adm / "train" / "nature", 1, jpeg=True)
    big = root / "BigGAN"
    _images(big / "val" / "ai", 1)
    _images(big / "val" / "nature", 2, jpeg=True, ext="jpg")
    _images(big / "train" / "ai", 1, ext="PNG")
    _images(big / "train" / "nature", 1, jpeg=True)
    (big / "val" / "ai" / "README.txt").write_text("not an image")
    (root / "README.md").write_text("GenImage")
    return root


def test_genimage_val_is_the_default_split_counts_labels_generators(genimage):
    index = open_dataset(f"genimage:{genimage}")
    assert index.name == "GenImage"
    assert len(index.records) == 8
    by = Counter((r.family, r.label) for r in index.records)
    assert by == {("ADM", 1): 2, ("ADM", 0): 3, ("BigGAN", 1): 1, ("BigGAN", 0): 2}
    assert all("/val/" in r.path for r in index.records)
    for r in index.records:  # ai/ holds the fakes, nature/ the reals
        assert ("/ai/" in r.path) == (r.label == 1) and ("/nature/" in r.path) == (r.label == 0)
    assert len({r.video for r in index.records}) == 8  # every image its own "video"
    assert "ADM/val/ai/000.png" in {r.video for r in index.records}
    s = index.summary()
    assert s["frames"] == {"real": 5, "fake": 3} and s["videos"] == s["frames"]
    assert s["skipped"]["non-image files"]["count"] == 1
    assert s["skipped"]["files outside the image folders"]["count"] == 1
    assert index.skipped["non-image files"]["example"].endswith("README.txt")


def test_genimage_train_split_and_one_generator_folder(genimage):
    train = open_dataset(f"genimage:{genimage}@train")
    assert Counter((r.family, r.label) for r in train.records) == {
        ("ADM", 0): 1,
        ("ADM", 1): 1,
        ("BigGAN", 0): 1,
        ("BigGAN", 1): 1,
    }
    assert all("/train/" in r.path for r in train.records)
    one = open_dataset(f"genimage:{genimage / 'BigGAN'}")
    assert Counter((r.family, r.label) for r in one.records) == {("BigGAN", 0): 2, ("BigGAN", 1): 1}
    assert open_dataset(f"genimage:{genimage}", split="train").summary()["frames"] == {"real": 2, "fake": 2}


@pytest.mark.parametrize(
    ("make", "spec_tail", "message"),
    [
        (lambda r: None, "@test", "GenImage has no split 'test' (known: train, val"),
        (
            lambda r: (r / "BigGAN" / "val" / "nature").rename(r.parent / "nature-moved"),
            "",
            "expected exactly ai/ and nature/ folders; found ai/",
        ),
        (
            lambda r: _images(r / "Stray" / "pictures", 1),
            "",
            "Stray: neither it nor a folder in it holds train/ or val/",
        ),
        (
            lambda r: _images(r / "ADM" / "second" / "val" / "ai", 1),
            "",
            "several folders in it hold train/ or val/ (imagenet_ai_0508_adm, second)",
        ),
        (
            lambda r: _images(r / "VQDM" / "train" / "ai", 1),
            "",
            "VQDM: no val/ folder for generator 'VQDM'; found train/",
        ),
    ],
)
def test_genimage_broken_layouts_are_one_line_errors(genimage, make, spec_tail, message):
    make(genimage)
    with pytest.raises(DataError) as err:
        open_dataset(f"genimage:{genimage}{spec_tail}")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_genimage_without_images_or_folder(tmp_path):
    for name in ("ai", "nature"):
        (tmp_path / "G" / "val" / name).mkdir(parents=True)
    (tmp_path / "G" / "val" / "ai" / "list.txt").write_text("x")
    with pytest.raises(
        DataError, match=r"G: no images found \(expected GenImage's .*found 1 non-image files\)"
    ):
        open_dataset(f"genimage:{tmp_path / 'G'}")
    with pytest.raises(DataError, match="GenImage folder not found"):
        open_dataset(f"genimage:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: expected GenImage's .*; found nothing"):
        open_dataset(f"genimage:{tmp_path / 'empty'}")


@pytest.fixture
def univfd(tmp_path):
    """progan split by object class, biggan flat, guided fakes only (as UniversalFakeDetect's diffusion)."""
    root = tmp_path / "test"
    for cls in ("airplane", "car"):
        _images(root / "progan" / cls / "0_real", 1)
        _images(root / "progan" / cls / "1_fake", 1)
    _images(root / "biggan" / "0_real", 2, jpeg=True, ext="jpeg")
    _images(root / "biggan" / "1_fake", 1, ext="webp")
    _images(root / "guided" / "1_fake", 1)
    (root / "biggan" / "1_fake" / "list.csv").write_text("x")
    return root


def test_univfd_generators_are_the_first_level_not_the_object_classes(univfd):
    index = open_dataset(f"univfd:{univfd}")
    by = Counter((r.family, r.label) for r in index.records)
    assert by == {("progan", 0): 2, ("progan", 1): 2, ("biggan", 0): 2, ("biggan", 1): 1, ("guided", 1): 1}
    for r in index.records:
        assert ("/0_real/" in r.path) == (r.label == 0)
    assert {r.video for r in index.records if r.family == "progan"} == {
        f"progan/{cls}/{c}/000.png" for cls in ("airplane", "car") for c in ("0_real", "1_fake")
    }
    assert index.skipped["non-image files"]["count"] == 1
    assert any("guided (fakes only)" in note for note in index.notes)
    assert "guided (fakes only)" in index.describe()


def test_univfd_one_generator_folder_with_and_without_classes(univfd, tmp_path):
    progan = open_dataset(f"univfd:{univfd / 'progan'}")
    assert Counter((r.family, r.label) for r in progan.records) == {("progan", 0): 2, ("progan", 1): 2}
    biggan = open_dataset(f"univfd:{univfd / 'biggan'}")
    assert Counter((r.family, r.label) for r in biggan.records) == {("biggan", 0): 2, ("biggan", 1): 1}
    # CNNDetection's training set: ProGAN's object classes straight under the split folder
    train = tmp_path / "train"
    for cls in ("airplane", "bird", "tvmonitor"):
        _images(train / cls / "0_real", 1)
        _images(train / cls / "1_fake", 2)
    index = open_dataset(f"univfd:{train}")
    assert Counter((r.family, r.label) for r in index.records) == {("train", 0): 3, ("train", 1): 6}


def test_univfd_broken_layouts(univfd):
    (univfd / "stylegan" / "car" / "0_real").mkdir(parents=True)
    (univfd / "stylegan" / "notes").mkdir()
    with pytest.raises(
        DataError, match=r"stylegan/notes: expected 0_real/ and 1_fake/ folders .*; found nothing"
    ):
        open_dataset(f"univfd:{univfd}")
    (univfd / "stylegan" / "notes").rmdir()
    (univfd / "biggan" / "2_other").mkdir()
    with pytest.raises(
        DataError,
        match=r"biggan: expected only 0_real/ and 1_fake/ folders .*found 0_real/, 1_fake/, 2_other/",
    ):
        open_dataset(f"univfd:{univfd}")


def test_chameleon_is_one_generator(tmp_path):
    root = tmp_path / "Chameleon" / "test"
    _images(root / "0_real", 2, jpeg=True, ext="jpg")
    _images(root / "1_fake", 3)
    index = open_dataset(f"chameleon:{root}")
    assert Counter((r.family, r.label) for r in index.records) == {("chameleon", 0): 2, ("chameleon", 1): 3}
    assert not index.notes
    bad = tmp_path / "wrong"
    _images(bad / "real", 1)
    with pytest.raises(
        DataError, match=r"wrong: expected Chameleon's ROOT/\{0_real,1_fake\}/<images>; found real/"
    ):
        open_dataset(f"chameleon:{bad}")


def test_unknown_kind_lists_the_new_readers(tmp_path):
    with pytest.raises(DataError, match="known: dfb, folder, frames, genimage, univfd, chameleon"):
        open_dataset(f"imagenet:{tmp_path}")

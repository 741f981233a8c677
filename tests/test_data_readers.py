"""DeepfakeBench and folder readers behind ``open_dataset``."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_fixtures import make_dfb_fixture, write_png
from masm.data.sampling import balance_indices, sample_indices
from masm.data.spec import open_dataset
from masm.errors import DataError


@pytest.fixture
def dfb_fixture(tmp_path):
    return make_dfb_fixture(tmp_path)


def test_sample_indices_linspace_and_first():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(10, 4, "first") == [0, 1, 2, 3]
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(0, 8) == []


def test_balance_indices_resamples_reals_seeded():
    labels = [0, 0, 1, 1, 1, 1, 1]
    a, b = balance_indices(labels, seed=1), balance_indices(labels, seed=1)
    assert a == b
    counts = Counter(labels[i] for i in a)
    assert counts[0] == counts[1] == 5
    many_reals = [0] * 6 + [1] * 2
    assert Counter(many_reals[i] for i in balance_indices(many_reals, 0)) == {0: 2, 1: 2}


def test_dfb_counts_labels_keys_and_paths(dfb_fixture):
    index = open_dataset(f"dfb:{dfb_fixture['json']}", data_root=dfb_fixture["data_root"], frames_per_video=4)
    assert index.name == "FaceForensics++"
    s = index.summary()
    assert s["videos"] == {"real": 1, "fake": 2}  # FF-DF and FF-F2F share 000_003 but stay apart
    assert s["frames"] == {"real": 4, "fake": 8}
    assert s["families"] == {"FF-DF": {"videos": 1, "frames": 4}, "FF-F2F": {"videos": 1, "frames": 4}}
    assert not s["skipped"]
    keys = {r.video for r in index.records}
    assert keys == {
        "FaceForensics++/FF-real/000_003",
        "FaceForensics++/FF-DF/000_003",
        "FaceForensics++/FF-F2F/000_003",
    }
    # linspace over 8 listed frames: 0, 2, 5, 7
    df = sorted(r.path for r in index.records if r.family == "FF-DF")
    assert [p.rsplit("/", 1)[1] for p in df] == ["000.png", "002.png", "005.png", "007.png"]
    f2f = [r.path for r in index.records if r.family == "FF-F2F"]  # Windows paths found under data_root
    assert all(p.startswith(str(dfb_fixture["data_root"])) and "\\" not in p for p in f2f)
    assert "c23" in next(r.path for r in index.records if r.label == 0)
    assert "real" in index.describe() and "FF-DF" in index.describe()


def test_dfb_compression_split_and_parity(dfb_fixture):
    spec, root = f"dfb:{dfb_fixture['json']}", dfb_fixture["data_root"]
    c40 = open_dataset(spec, data_root=root, compression="c40", frames_per_video=2)
    assert c40.summary()["videos"] == {"real": 1, "fake": 0}
    assert all("c40" in r.path for r in c40.records)
    assert c40.summary()["skipped"]["labels without compression c40"]["count"] == 2
    with pytest.raises(DataError, match="no label has split 'val'"):
        open_dataset(spec + "@val", data_root=root)
    train = open_dataset(spec + "@train", data_root=root, frames_per_video=3)
    assert train.summary()["videos"] == {"real": 1, "fake": 0}
    parity = open_dataset(spec, data_root=root, frames_per_video=3, parity=True)
    assert {r.video for r in parity.records} == {"000_003"}  # DeepfakeBench's merged key
    assert sorted({r.path.rsplit("/", 1)[1] for r in parity.records}) == ["000.png", "001.png", "002.png"]


def test_dfb_relative_to_json_folder_without_compression(tmp_path):
    write_png(tmp_path / "frames" / "v1" / "000.png")
    write_png(tmp_path / "frames" / "v2" / "000.png")
    index = {
        "Celeb-DF-v2": {
            "CelebDFv2_real": {"test": {"v1": {"label": "CelebDFv2_real", "frames": ["frames/v1/000.png"]}}},
            "CelebDFv2_fake": {
                "test": {"v2": {"label": "CelebDFv2_fake", "frames": ["./frames\\v2\\000.png"]}}
            },
        }
    }
    (tmp_path / "celeb.json").write_text(json.dumps(index))
    ds = open_dataset(f"dfb:{tmp_path / 'celeb.json'}", balance=True)
    assert ds.summary()["frames"] == {"real": 1, "fake": 1}


def test_dfb_unknown_label_names_label_and_file(tmp_path):
    index = {"X": {"weird": {"test": {"v": {"label": "weird", "frames": ["a.png"]}}}}}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"unknown label 'weird'") as err:
        open_dataset(f"dfb:{path}")
    assert str(path) in str(err.value)
    write_png(tmp_path / "a.png")
    assert open_dataset(f"dfb:{path}", label_dict={"weird": 1}).records[0].label == 1  # config extension


def test_dfb_missing_frames_counted_not_replaced(tmp_path):
    fixture = make_dfb_fixture(tmp_path, frames_per_video=4)
    missing = (
        fixture["data_root"]
        / fixture["index"]["FaceForensics++"]["FF-DF"]["test"]["c23"]["000_003"]["frames"][1]
    )
    missing.unlink()
    ds = open_dataset(f"dfb:{fixture['json']}", data_root=fixture["data_root"], frames_per_video=4)
    assert ds.summary()["frames"]["fake"] == 7
    skipped = ds.summary()["skipped"]["missing frame files"]
    assert skipped["count"] == 1 and str(missing) == skipped["example"]
    assert "1 missing frame files" in ds.describe()


def test_dfb_bad_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        open_dataset(f"dfb:{tmp_path / 'bad.json'}")
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"dfb:{tmp_path / 'none.json'}")
    with pytest.raises(DataError, match="unknown kind"):
        open_dataset("csv:x")


def test_folder_dataset_layout(tmp_path):
    root = tmp_path / "mydata"
    for i in range(4):
        write_png(root / "real" / "vid_a" / f"{i}.png")
    write_png(root / "real" / "photo.png")
    for i in range(3):
        write_png(root / "fake" / "gan" / "clip1" / f"{i}.png")
    write_png(root / "fake" / "diffusion" / "img1.png")
    write_png(root / "fake" / "diffusion" / "img2.png")
    (root / "fake" / "diffusion" / "notes.txt").write_text("hello")
    ds = open_dataset(f"folder:{root}", frames_per_video=2)
    s = ds.summary()
    assert ds.name == "mydata"
    assert s["videos"] == {"real": 2, "fake": 3}
    assert s["frames"] == {"real": 3, "fake": 4}
    assert s["families"]["gan"] == {"videos": 1, "frames": 2}
    assert s["families"]["diffusion"] == {"videos": 2, "frames": 2}
    assert s["skipped"]["non-image files"]["count"] == 1


def test_folder_wrong_layout_is_an_error(tmp_path):
    write_png(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match="expected only 'real/' and 'fake/'"):
        open_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"folder:{tmp_path / 'nope'}")


def test_describe_counts_frames_for_images_and_videos_for_videos(tmp_path):
    images = tmp_path / "photos"
    for i in range(3):
        write_png(images / "real" / f"{i}.png")
    write_png(images / "fake" / "gan" / "a.png")
    line = open_dataset(f"folder:{images}", frames_per_video=2).describe()
    assert line == "photos: real 3 frames, fake 1 frames (gan 1)"
    clips = tmp_path / "clips"
    for i in range(2):
        write_png(clips / "real" / "vid_a" / f"{i}.png")
        write_png(clips / "fake" / "gan" / "vid_b" / f"{i}.png")
    line = open_dataset(f"folder:{clips}", frames_per_video=2).describe()
    assert line == "clips: real 1 videos / 2 frames, fake 1 videos / 2 frames (gan 1)"


def test_corrupt_video_error_in_words_naming_the_file(tmp_path):
    from masm.data.video import count_frames, read_frames

    path = tmp_path / "clip.mp4"
    path.write_bytes(bytes(range(256)) * 16)
    for read in (count_frames, lambda p: read_frames(p, 4)):
        with pytest.raises(DataError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: cannot open video (invalid or corrupt data")
        assert "Errno" not in message and "1094995529" not in message and message.count(str(path)) == 1

"""Face detection/alignment and ``masm preprocess`` end to end on a real face (scikit-image's astronaut)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_fixtures import astronaut_frames, write_video
from masm.cli.main import main
from masm.data.faces import ARCFACE_TEMPLATE_112, FaceAligner, align_template
from masm.data.preprocess import Settings, run_preprocess
from masm.data.spec import open_dataset
from masm.errors import MasmError

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "astronaut.mp4", astronaut_frames())


def test_align_template_scaling():
    assert np.allclose(align_template(112, 1.0), ARCFACE_TEMPLATE_112)
    t = align_template(256, 1.3)
    eye_dist = np.linalg.norm(t[1] - t[0])
    assert np.isclose(
        eye_dist, np.linalg.norm(ARCFACE_TEMPLATE_112[1] - ARCFACE_TEMPLATE_112[0]) * 256 / 112 / 1.3
    )
    assert np.allclose(t.mean(0) - 128, (ARCFACE_TEMPLATE_112.mean(0) - 56) * 256 / 112 / 1.3)


def test_detect_and_align_astronaut():
    aligner = FaceAligner(crop_size=256, scale=1.3, detect_width=128)  # detection on a 2x downscaled frame
    frame = astronaut_frames(1)[0]
    faces = aligner.detect(frame)
    assert len(faces) >= 1
    x0, y0, x1, y1 = faces[0].box
    assert 60 < x0 < 110 and 50 < y0 < 100 and 150 < x1 < 200 and 130 < y1 < 190  # in full-res pixels
    crop = aligner.align(frame, faces[0])
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    matrix = aligner.transform_for(faces[0])
    mapped = faces[0].landmarks @ matrix[:, :2].T + matrix[:, 2]
    redetected = FaceAligner(256, 1.3, detect_width=0).detect(crop)[0].landmarks
    assert np.abs(redetected - mapped).max() < 3  # the crop really is the mapped geometry
    template = aligner.template
    assert np.abs(mapped[:3] - template[:3]).max() < 8  # eyes and nose on the template
    assert np.abs(mapped - template).max() < 12  # mouth: her smile is narrower than the template's


def test_no_face_frame():
    assert FaceAligner().detect(np.full((120, 160, 3), 90, np.uint8)) == []


def test_preprocess_video_reads_back_through_dfb(tmp_path, astronaut_video):
    out = tmp_path / "out"
    summary = run_preprocess(
        astronaut_video, out, "astro", label="real", settings=Settings(frames=4, size=128), progress=False
    )
    assert summary["videos_with_faces"] == 1 and summary["frames_written"] == 4
    assert summary["frames_without_face"] == 0
    crops = sorted((out / "frames" / "astronaut").glob("*.png"))
    assert [p.name for p in crops] == ["000.png", "002.png", "003.png", "005.png"]
    aligner = FaceAligner(128, 1.3, detect_width=0)
    for path in crops:
        crop = np.asarray(Image.open(path).convert("RGB"))
        faces = aligner.detect(crop)
        assert faces, path
        assert np.abs(faces[0].landmarks[:3] - aligner.template[:3]).max() < 5
    ds = open_dataset(f"dfb:{out / 'astro.json'}", frames_per_video=32)
    assert ds.name == "astro" and ds.summary()["frames"] == {"real": 4, "fake": 0}
    assert {r.video for r in ds.records} == {"astro/real/astronaut"}
    # a rerun reuses the finished video
    again = run_preprocess(
        astronaut_video, out, "astro", label="real", settings=Settings(frames=4, size=128), progress=False
    )
    assert again["videos_resumed"] == 1 and again["frames_written"] == 4


def test_preprocess_tree_with_bad_inputs_via_cli(tmp_path, capsys):
    src = tmp_path / "src"
    write_video(src / "real" / "face.mp4", astronaut_frames(3))
    write_video(src / "fake" / "swap" / "blank.mp4", [np.full((64, 64, 3), 80, np.uint8)] * 3)  # no face
    (src / "fake" / "swap" / "broken.mp4").write_bytes(b"garbage" * 40)
    (src / "fake" / "swap" / "empty.mp4").write_bytes(b"")
    Image.fromarray(astronaut_frames(1)[0]).save(src / "fake" / "photo.jpg")  # a still image is a video
    (src / "real" / "readme.txt").write_text("notes")
    out = tmp_path / "out"
    rc = main(["preprocess", str(src), "--out", str(out), "--name", "mixed", "--frames", "2", "--size", "96",
               "--workers", "2", "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "1 without any face" in printed and "2 unreadable" in printed and "1 other files skipped" in printed
    )
    assert "blank.mp4" in printed and "broken.mp4" in printed
    summary = json.loads((out / "mixed.summary.json").read_text())
    assert summary["videos"] == 5 and summary["videos_with_faces"] == 2
    assert summary["frames_without_face"] == 2
    index = json.loads((out / "mixed.json").read_text())["mixed"]
    assert index["fake"]["test"]["fake/swap/blank"]["frames"] == []
    assert index["fake"]["test"]["fake/swap/blank"]["no_face"] == [0, 2]
    assert "error" in index["fake"]["test"]["fake/swap/broken"]
    ds = open_dataset(f"dfb:{out / 'mixed.json'}")
    s = ds.summary()
    assert s["videos"] == {"real": 1, "fake": 1} and s["skipped"]["videos without frames"]["count"] == 3
    assert s["families"] == {}  # the photo lies directly in fake/: no family
    assert {r.video for r in ds.records} == {"mixed/real/real/face", "mixed/fake/fake/photo"}


def test_preprocess_user_errors(tmp_path, astronaut_video):
    with pytest.raises(MasmError, match="--label"):
        run_preprocess(astronaut_video, tmp_path, "x", progress=False)
    with pytest.raises(MasmError, match="not a known label"):
        run_preprocess(astronaut_video, tmp_path, "x", label="bogus", progress=False)
    assert main(["preprocess", str(tmp_path / "nope"), "--out", str(tmp_path), "--name", "x"]) == 2

"""``masm detect`` and :class:`masm.inference.Scorer`: faces, videos, batching, merged vs unmerged, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import write_video
from masm.inference import RESULT_KEYS, Scorer, ScorerOptions
from masm.models import FaceCropConfig, Preprocessing, create_detector, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# -- builders -------------------------------------------------------------------------------------------


def face_detector():
    """tiny-clip whose preprocessing asks for aligned face crops; non-zero adapters so merging matters."""
    detector = create_detector(
        "tiny-clip", "masm", preprocessing=Preprocessing(input_size=32, face_crop=FaceCropConfig())
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in detector.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return detector.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(face_detector(), tmp_path_factory.mktemp("ckpt") / "face")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def write_empty_video(path: Path) -> Path:
    """A valid MP4 container with a video stream and no frames."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()  # writes the header; MP4 then lists no video track at all
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` (900 M) pixels, with a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit gray
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def build_inputs(root: Path, astronaut: np.ndarray) -> tuple[dict[str, Path], dict[str, Path]]:
    """Good inputs (every image mode that must be scored, a video, a folder) and one file per bad case."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    good_dir, bad_dir = root / "good", root / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    good = {
        "rgb": good_dir / "rgb.png",
        "face": good_dir / "astronaut.jpg",
        "gray16": good_dir / "gray16.png",
        "palette": good_dir / "palette.png",
        "rgba": good_dir / "rgba.png",
        "gray": good_dir / "gray.png",
        "cmyk": good_dir / "cmyk.jpg",
        "noext": good_dir / "image_without_extension",
        "video": good_dir / "clip.mp4",
    }
    Image.fromarray(rgb).save(good["rgb"])
    Image.fromarray(astronaut).save(good["face"], quality=90)
    Image.fromarray((rng.integers(0, 65536, (48, 64))).astype(np.uint16)).save(good["gray16"])
    Image.fromarray(rgb).convert("P").save(good["palette"])
    Image.fromarray(np.dstack([rgb, np.full((48, 64), 200, np.uint8)]), "RGBA").save(good["rgba"])
    Image.fromarray(rgb[:, :, 0]).save(good["gray"])
    Image.fromarray(rgb).convert("CMYK").save(good["cmyk"])
    Image.fromarray(rgb).save(good["noext"], format="PNG")
    write_video(good["video"], [np.roll(rgb, i, axis=1) for i in range(6)])

    bad = {
        "zero": bad_dir / "zero.png",
        "truncated": bad_dir / "truncated.png",
        "not_image": bad_dir / "notes.jpg",
        "tiny": bad_dir / "one_pixel.png",
        "bomb": bad_dir / "bomb.png",
        "corrupt_video": bad_dir / "corrupt.mp4",
        "empty_video": bad_dir / "empty.mp4",
        "missing": bad_dir / "does_not_exist.png",
        "empty_folder": bad_dir / "empty_folder",
    }
    bad["zero"].write_bytes(b"")
    bad["truncated"].write_bytes(good["rgb"].read_bytes()[:200])
    bad["not_image"].write_text("this is text, not a JPEG\n" * 10)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(bad["tiny"])
    write_png_bomb(bad["bomb"])
    bad["corrupt_video"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    write_empty_video(bad["empty_video"])
    bad["empty_folder"].mkdir()
    return good, bad


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m masm ARGS`` in a subprocess, as a user runs it."""
    argv = [sys.executable, "-m", "masm", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


# -- tests ----------------------------------------------------------------------------------------------


def test_cli_scores_good_inputs_and_reports_every_bad_one(tmp_path, checkpoint, astronaut):
    good, bad = build_inputs(tmp_path, astronaut)
    listing = f"{good['rgb']}\n{bad['missing']}\n"
    args = [str(p) for k, p in good.items() if k not in ("rgb",)] + [str(p) for p in bad.values()]
    out = tmp_path / "results.jsonl"
    proc = run_cli(
        "detect", str(checkpoint), "-", *args, "--out", str(out), "--batch-size", "4", stdin=listing
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    by_input = {r["input"]: r for r in results}
    assert [r["input"] for r in results[:2]] == [str(good["rgb"]), str(bad["missing"])]  # stdin first
    assert len(results) == len(good) + len(bad) + 1  # the missing path comes twice (stdin and argv)
    for r in results:
        assert set(RESULT_KEYS) <= set(r)

    for name, path in good.items():
        r = by_input[str(path)]
        assert r["error"] is None, (name, r)
        assert 0.0 <= r["score"] <= 1.0 and r["label"] in ("fake", "real"), (name, r)
        assert r["kind"] == ("video" if name == "video" else "image"), (name, r)
    assert by_input[str(good["face"])]["faces"] >= 1
    assert by_input[str(good["rgb"])]["faces"] == 0 and "no face" in by_input[str(good["rgb"])]["note"]
    assert by_input[str(good["video"])]["frames"] == 6

    expected = {
        "zero": "empty file",
        "truncated": "truncated",
        "not_image": "not an image",
        "tiny": "too small",
        "bomb": "decompression bomb",
        "corrupt_video": "invalid or corrupt data",
        "empty_video": "no video stream",
        "missing": "no such file",
        "empty_folder": "no image or video",
    }
    for name, fragment in expected.items():
        r = by_input[str(bad[name])]
        assert r["error"] and fragment in r["error"], (name, r)
        assert r["score"] is None and r["label"] is None, (name, r)
    assert "could not be scored" in proc.stderr

    # A folder is recursed, images recognised by content (the extension-less PNG), nothing else listed.
    proc = run_cli("detect", str(checkpoint), str(tmp_path / "good"), "--no-face", "--threshold", "0.0")
    assert proc.returncode == 0, proc.stderr
    folder = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["input"] for r in folder} == {str(p) for p in good.values()}
    assert all(r["label"] == "fake" and r["faces"] is None for r in folder)


def test_cli_usage_errors_exit_2_without_traceback(tmp_path):
    proc = run_cli("detect", str(tmp_path / "no_checkpoint"), str(tmp_path))
    assert proc.returncode == 2
    assert "checkpoint directory not found" in proc.stderr and "Traceback" not in proc.stderr


def test_astronaut_face_is_found_aligned_and_scored(tmp_path, astronaut):
    detector = face_detector()
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    scorer = Scorer(detector)
    (result,) = scorer.score_paths([str(path)])
    assert result["error"] is None and result["faces"] >= 1 and result["note"] is None
    # The score is the model's score of the aligned crop, the same crop preprocessing would write.
    from masm.data.faces import FaceAligner
    from masm.data.transforms import build_transform

    aligner = FaceAligner(256, 1.3)
    faces = aligner.detect(astronaut)
    crops = [build_transform(detector.preprocessing, train=False)(aligner.align(astronaut, f)) for f in faces]
    expected = scorer.score_tensor(torch.stack(crops)).max().item()
    assert result["score"] == pytest.approx(expected, abs=1e-6)


def test_video_per_frame_and_merged_matches_unmerged(tmp_path, astronaut):
    frames = [
        np.ascontiguousarray(astronaut[10 + 2 * i : 266 + 2 * i, 90 + 3 * i : 346 + 3 * i]) for i in range(8)
    ]
    video = write_video(tmp_path / "face.mp4", frames)
    image = tmp_path / "face.png"
    Image.fromarray(astronaut).save(image)
    detector = face_detector()
    options = ScorerOptions(frames=4, per_frame=True, batch_size=3)
    merged = list(Scorer(detector, options, merge=True).score_paths([str(video), str(image)]))
    unmerged = list(Scorer(detector, options, merge=False).score_paths([str(video), str(image)]))
    assert not detector.merged  # the caller's detector is not changed
    r = merged[0]
    assert r["kind"] == "video" and r["error"] is None and r["frames"] == 4 and r["faces"] >= 1
    assert [f["frame"] for f in r["frame_scores"]] == [0, 2, 5, 7]
    assert r["score"] == pytest.approx(np.mean([f["score"] for f in r["frame_scores"]]), abs=1e-7)
    for a, b in zip(merged, unmerged):
        assert abs(a["score"] - b["score"]) <= 1e-5
        if "frame_scores" in a:
            for fa, fb in zip(a["frame_scores"], b["frame_scores"]):
                assert abs(fa["score"] - fb["score"]) <= 1e-5


def test_batches_span_inputs_and_do_not_change_scores(tmp_path):
    detector = create_detector(
        "tiny-clip", "masm", preprocessing=Preprocessing(input_size=32, face_crop=None)
    )
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    names = [str(p) for p in paths]
    calls = []
    scorer = Scorer(detector, ScorerOptions(batch_size=4))
    original = scorer.log_odds_tensor  # what the scorer runs per batch
    scorer.log_odds_tensor = lambda x: calls.append(len(x)) or original(x)
    batched = [r["score"] for r in scorer.score_paths(names)]
    assert calls == [4, 1]
    single = [r["score"] for r in Scorer(detector, ScorerOptions(batch_size=1)).score_paths(names)]
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_merged_export_is_scored_like_the_adapter_checkpoint(tmp_path, checkpoint, astronaut):
    from masm.inference import export_merged
    from masm.models import read_checkpoint_config

    merged_dir = export_merged(checkpoint, tmp_path / "merged")
    assert read_checkpoint_config(merged_dir)["weights"] == "merged"
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    a = next(Scorer(checkpoint).score_paths([str(path)]))
    b = next(Scorer(merged_dir).score_paths([str(path)]))
    assert a["faces"] == b["faces"] >= 1
    assert abs(a["score"] - b["score"]) <= 1e-5

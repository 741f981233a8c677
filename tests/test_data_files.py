"""Image and video loading on good and bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_fixtures import astronaut_frames, write_video
from masm.data.images import is_image_file, is_video_file, load_rgb
from masm.data.video import count_frames, read_frames
from masm.errors import DataError


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "astronaut.mp4", astronaut_frames())


def test_load_rgb_modes(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out[0, 0, 0] == 100  # on black
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert load_rgb(tmp_path / "g16.png").max() == 255
    Image.new("P", (6, 2), 3).save(tmp_path / "pal.png")
    Image.new("L", (1, 1), 7).save(tmp_path / "one.png")
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    for name in ("pal.png", "one.png", "cmyk.jpg"):
        arr = load_rgb(tmp_path / name)
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8
    assert load_rgb(tmp_path / "one.png").shape == (1, 1, 3)


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "missing"])
def test_load_rgb_bad_files_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("not an image at all")
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=path.name):
        load_rgb(path)


def test_load_rgb_refuses_bomb_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(DataError, match="decompression bomb"):
        load_rgb(path, max_pixels=100_000)
    assert load_rgb(path).shape == (300, 400, 3)


def test_file_kind_by_content(tmp_path, astronaut_video):
    img = tmp_path / "photo.bin"  # image without an image extension
    Image.new("RGB", (8, 8)).save(img, format="PNG")
    assert is_image_file(img) and not is_video_file(img)
    assert is_video_file(astronaut_video) and not is_image_file(astronaut_video)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    assert not is_video_file(junk) and not is_image_file(junk)


def test_read_frames_linspace_and_first(astronaut_video):
    assert count_frames(astronaut_video) == 6
    frames = read_frames(astronaut_video, 3)
    assert [i for i, _ in frames] == [0, 2, 5] or [i for i, _ in frames] == [0, 3, 5]
    assert frames[0][1].shape == (256, 256, 3) and frames[0][1].dtype == np.uint8
    assert [i for i, _ in read_frames(astronaut_video, 2, mode="first")] == [0, 1]
    # RGB order: the astronaut's red-dominated flag stays red in the decoded frame's colour balance
    decoded, original = frames[0][1].astype(float), astronaut_frames()[0].astype(float)
    assert np.abs(decoded.mean((0, 1)) - original.mean((0, 1))).max() < 4


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "missing"])
def test_read_frames_bad_videos_name_the_file(tmp_path, astronaut_video, case):
    path = tmp_path / f"{case}.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not a video" * 50)
    elif case == "truncated":
        path.write_bytes(astronaut_video.read_bytes()[:2000])
    with pytest.raises(DataError, match=path.name):
        read_frames(path, 4)


def test_read_frames_video_without_frames(tmp_path):
    import av

    path = tmp_path / "noframes.mp4"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    with pytest.raises(DataError, match="noframes.mp4"):
        read_frames(path, 4)


def test_a_text_file_named_like_an_image_is_not_a_video(tmp_path):
    from masm.data.images import is_image_file, is_video_file

    path = tmp_path / "note.jpg"
    path.write_text("not an image, and not a video either\n")
    assert not is_video_file(path) and not is_image_file(path)

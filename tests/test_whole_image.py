"""Whole-image detectors: how an image of any size becomes the input (training crop and augmentation,
centre crop without resize, tiles), detect, evaluation scoring and ONNX on them, old checkpoints unchanged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from masm.config import from_dict, to_dict
from masm.data.transforms import AugmentConfig, build_transform, resize_square
from masm.data.whole_image import combine_tile_log_odds, tile_origins
from masm.errors import ConfigError
from masm.models import Preprocessing, WholeImageConfig, create_detector, load_checkpoint, save_checkpoint

S = 32  # input size for speed; small_side 40 plays Effort's 256 for an input of 224
SIZES = [(20, 27), (32, 32), (32, 50), (45, 33), (39, 41), (70, 50), (100, 150)]


def whole(test: str = "center_crop", **kwargs) -> Preprocessing:
    return Preprocessing(
        input_size=S, face_crop=None, whole_image=WholeImageConfig(test=test, small_side=40, **kwargs)
    )


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def normalised(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The reference normalisation, (pixel - 255 mean) / (255 std) in float32, CHW."""
    mean = np.asarray(pre.mean, np.float32) * 255.0
    std = np.asarray(pre.std, np.float32) * 255.0
    return ((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def effort_center_crop(rgb: np.ndarray, size: int, small_side: int) -> np.ndarray:
    """Reference: np.tile each short side periodically up to small_side, then the centre crop."""
    h, w = rgb.shape[:2]
    big = np.tile(rgb, (math.ceil(small_side / h), math.ceil(small_side / w), 1))
    big = big[: max(h, small_side), : max(w, small_side)]
    top, left = (big.shape[0] - size) // 2, (big.shape[1] - size) // 2
    return big[top : top + size, left : left + size]


def trained_whole(test: str = "center_crop"):
    detector = create_detector("tiny-clip", "masm", preprocessing=whole(test))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        for p in detector.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return detector.eval()


def write_pngs(folder, sizes=SIZES) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"{i}-{h}x{w}.png")
        Image.fromarray(image(h, w, seed=i)).save(paths[-1])
    return paths


# -- the configuration --------------------------------------------------------------------------------------


def test_whole_image_config_round_trips_and_rejects_bad_values():
    pre = whole("tiles", jpeg_quality=(50, 90))
    data = to_dict(pre)
    assert data["whole_image"] == {
        "train": "random_crop",
        "test": "tiles",
        "small_side": 40,
        "hflip": 0.5,
        "blur_prob": 0.1,
        "blur_sigma": [0.0, 3.0],
        "jpeg_prob": 0.1,
        "jpeg_quality": [50, 90],
    }
    assert from_dict(Preprocessing, data) == pre
    assert from_dict(Preprocessing, {}).whole_image is None  # the default: today's resize, unchanged
    with pytest.raises(
        ConfigError, match=r"'whole_image.small_side': must be at least input_size \(40 < 64\)"
    ):
        from_dict(Preprocessing, {"input_size": 64, "whole_image": {"small_side": 40}})
    with pytest.raises(ConfigError, match="unknown config key 'sharpen'"):
        from_dict(WholeImageConfig, {"sharpen": 1})
    from masm.models import ModelConfig

    # inside a training config (preprocessing and whole_image may be null): the message names the key
    with pytest.raises(ConfigError, match="^unknown config key 'model.preprocessing.whole_image.sharpen'"):
        from_dict(ModelConfig, {"preprocessing": {"whole_image": {"sharpen": 1}}}, "model")
    with pytest.raises(ConfigError, match="'bicubic' is not one of 'center_crop', 'resize', 'tiles'"):
        from_dict(WholeImageConfig, {"test": "bicubic"})
    with pytest.raises(ConfigError, match=r"'blur_prob': a probability must lie in \[0, 1\]"):
        from_dict(WholeImageConfig, {"blur_prob": 1.5})
    with pytest.raises(ConfigError, match=r"'jpeg_quality': need 1 <= low <= high <= 100 \(got \[90, 50\]\)"):
        from_dict(WholeImageConfig, {"jpeg_quality": [90, 50]})


# -- test-time policies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_center_crop_is_effort_tiling_then_centre_crop_without_resize(size):
    pre = whole("center_crop")
    rgb = image(*size)
    out = build_transform(pre, train=False)(rgb).numpy()
    np.testing.assert_array_equal(out, normalised(effort_center_crop(rgb, S, 40), pre))


def test_center_crop_of_a_large_image_is_its_plain_centre():
    rgb = image(100, 150)
    out = build_transform(whole("center_crop"), train=False)(rgb).numpy()
    np.testing.assert_array_equal(out, normalised(rgb[34:66, 59:91], whole()))


@pytest.mark.parametrize("size", SIZES)
def test_resize_policy_is_todays_transform(size):
    rgb = image(*size)
    out = build_transform(whole("resize"), train=False)(rgb).numpy()
    old = build_transform(Preprocessing(input_size=S, face_crop=None), train=False)(rgb).numpy()
    np.testing.assert_array_equal(out, old)
    np.testing.assert_array_equal(out, normalised(resize_square(rgb, S), whole()))


def test_tile_grid_places_the_last_tile_against_the_far_edge():
    assert tile_origins(32, 32, S) == [(0, 0)]
    assert tile_origins(20, 27, S) == [(0, 0)]  # smaller than a tile: one tile, repeated periodically
    assert tile_origins(70, 50, S) == [(0, 0), (0, 18), (32, 0), (32, 18), (38, 0), (38, 18)]
    assert tile_origins(64, 96, S) == [(t, left) for t in (0, 32) for left in (0, 32, 64)]


@pytest.mark.parametrize("size", SIZES)
def test_tiles_cover_the_image_and_are_its_unresized_pixels(size):
    pre = whole("tiles")
    rgb = image(*size)
    transform = build_transform(pre, train=False)
    out = transform(rgb).numpy()
    origins = transform.crop_origins(*size)
    assert out.shape == (len(origins), 3, S, S)
    big = np.tile(rgb, (2, 2, 1))  # images smaller than a tile repeat periodically
    covered = np.zeros(size, bool)
    for tile, (top, left) in zip(out, origins):
        np.testing.assert_array_equal(tile, normalised(big[top : top + S, left : left + S], pre))
        covered[top : top + S, left : left + S] = True
    assert covered.all()


def test_tile_scores_combine_as_the_mean_probability():
    z = np.array([2.0, -1.0, 0.5, -3.0])
    mean_p = np.mean(1 / (1 + np.exp(-z)))
    assert combine_tile_log_odds(z) == pytest.approx(math.log(mean_p / (1 - mean_p)), abs=1e-12)
    assert combine_tile_log_odds([1.25]) == pytest.approx(1.25, abs=1e-12)
    assert combine_tile_log_odds([1000.0, -1000.0]) == pytest.approx(0.0, abs=1e-12)  # P 1 and 0: mean 0.5
    # P(fake) of 1 - 1e-300 and 0.5: mean 0.75 exactly, although float64 cannot hold the first one
    assert combine_tile_log_odds([690.0, 0.0]) == pytest.approx(math.log(3.0), abs=1e-9)


# -- training -----------------------------------------------------------------------------------------------


def find_window(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    h, w = big.shape[:2]
    return [
        (t, left)
        for t in range(h - S + 1)
        for left in range(w - S + 1)
        if np.array_equal(big[t : t + S, left : left + S], crop)
    ]


def train_crop(pre, rgb, seed, augment=False):
    transform = build_transform(pre, train=True, augment=AugmentConfig(enabled=augment), seed=seed)
    out = transform(rgb).numpy()
    mean = np.asarray(pre.mean, np.float32) * 255.0
    std = np.asarray(pre.std, np.float32) * 255.0
    return np.rint(out.transpose(1, 2, 0) * std + mean).astype(np.uint8), transform


def test_training_crop_is_a_random_unresized_window():
    rgb = image(70, 50)
    origins = set()
    for seed in range(6):
        crop, _ = train_crop(whole(), rgb, seed)
        (origin,) = find_window(rgb, crop)
        origins.add(origin)
    assert len(origins) > 1  # random, not always the same window
    again, transform = train_crop(whole(), rgb, 3)
    assert find_window(rgb, again) == find_window(rgb, train_crop(whole(), rgb, 3)[0])  # seeded
    transform.augmentation.set_random_seed(11)
    first = transform(rgb)
    transform.augmentation.set_random_seed(11)
    assert torch.equal(first, transform(rgb))


def test_training_enlarges_only_an_image_smaller_than_the_input():
    from masm.data.whole_image import enlarge_to

    small = image(20, 27)
    enlarged = enlarge_to(small, S)
    assert enlarged.shape == (32, 43, 3)
    crop, _ = train_crop(whole(), small, 0)
    assert len(find_window(enlarged, crop)) >= 1
    assert enlarge_to(image(40, 33), S).shape == (40, 33, 3)  # large enough: left alone


def test_training_flip_blur_and_jpeg_as_configured():
    import cv2

    rgb = image(S, S)  # the crop is the whole image, so the augmentation is all that changes it
    flipped, _ = train_crop(whole(hflip=1.0, blur_prob=0.0, jpeg_prob=0.0), rgb, 0, augment=True)
    np.testing.assert_array_equal(flipped, rgb[:, ::-1])
    blurred, _ = train_crop(
        whole(hflip=0.0, blur_prob=1.0, blur_sigma=(2.0, 2.0), jpeg_prob=0.0), rgb, 0, True
    )
    expected = cv2.GaussianBlur(rgb, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(blurred.astype(int) - expected.astype(int)).max() <= 1  # float32 round trip
    jpeg, _ = train_crop(whole(hflip=0.0, blur_prob=0.0, jpeg_prob=1.0, jpeg_quality=(40, 40)), rgb, 0, True)
    ok, data = cv2.imencode(".jpg", rgb[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 40])
    expected = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    assert np.abs(jpeg.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(jpeg.astype(int) - rgb.astype(int)).max() > 10  # really re-compressed
    plain, _ = train_crop(whole(hflip=1.0, blur_prob=1.0, jpeg_prob=1.0), rgb, 0, augment=False)
    np.testing.assert_array_equal(plain, rgb)  # augment.enabled false: only the crop remains


# -- checkpoints, detect, evaluation, ONNX ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    return {test: save_checkpoint(trained_whole(test), root / test) for test in ("center_crop", "tiles")}


def test_old_checkpoint_without_the_field_loads_with_the_old_behaviour(tmp_path):
    detector = create_detector("tiny-clip", "masm", preprocessing=Preprocessing(input_size=S, face_crop=None))
    ckpt = save_checkpoint(detector, tmp_path / "old")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["preprocessing"]["whole_image"] is None
    del config["model"]["preprocessing"]["whole_image"]  # as written before the field existed
    (ckpt / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(ckpt)
    assert loaded.preprocessing.whole_image is None
    rgb = image(45, 70)
    np.testing.assert_array_equal(
        build_transform(loaded.preprocessing, train=False)(rgb).numpy(),
        normalised(resize_square(rgb, S), whole()),
    )


def test_whole_image_preprocessing_travels_with_the_checkpoint(checkpoints):
    loaded = load_checkpoint(checkpoints["tiles"])
    assert loaded.preprocessing == whole("tiles")


def _log_odds(detector, pixels: torch.Tensor) -> np.ndarray:
    from masm.models.calibration import log_odds_of_logits

    with torch.no_grad():
        return log_odds_of_logits(detector(pixels)).double().numpy()


@pytest.mark.parametrize("test", ["center_crop", "tiles"])
def test_masm_detect_scores_an_image_and_a_folder(checkpoints, tmp_path, test):
    from masm.cli.main import main

    paths = write_pngs(tmp_path / "images")
    out = tmp_path / "detect.jsonl"
    assert (
        main(["detect", str(checkpoints[test]), str(paths[-1]), str(tmp_path / "images"), "--out", str(out)])
        == 0
    )
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in results] == [str(paths[-1]), *map(str, sorted(paths))]  # one line per input
    detector = load_checkpoint(checkpoints[test], merge=True)
    transform = build_transform(detector.preprocessing, train=False)
    for result in results:
        assert result["error"] is None and result["faces"] is None and result["frames"] == 1
        pixels = transform(np.asarray(Image.open(result["input"]).convert("RGB")))
        z = _log_odds(detector, pixels if test == "tiles" else pixels[None])
        expected = np.mean(1 / (1 + np.exp(-z)))  # tiles: the mean of the tiles' P(fake)
        assert result["score"] == pytest.approx(expected, abs=1e-6)
        assert result["raw_score"] == pytest.approx(expected, abs=1e-6)
    assert any(len(tile_origins(*Image.open(p).size[::-1], S)) > 1 for p in paths)


@pytest.mark.parametrize("test", ["center_crop", "tiles"])
def test_evaluation_scores_a_frame_as_detect_does(checkpoints, tmp_path, test):
    from masm.data.index import FrameRecord
    from masm.evaluation.scoring import score_records
    from masm.inference import Scorer

    paths = write_pngs(tmp_path / "images")
    detector = load_checkpoint(checkpoints[test], merge=True)
    records = [FrameRecord(path=str(p), label=i % 2, video=str(p)) for i, p in enumerate(paths)]
    log_odds = np.full(len(records), np.nan)
    transform = build_transform(detector.preprocessing, train=False)
    scores, failed = score_records(detector, records, transform, batch_size=3, log_odds=log_odds)
    assert failed == []
    detect = [r["score"] for r in Scorer(detector).score_paths([str(p) for p in paths])]
    np.testing.assert_allclose(scores, detect, atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-log_odds)), detect, atol=1e-6)


def test_onnx_center_crop_equals_detect(checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from masm.inference import export_onnx
    from masm.inference.export import onnx_scores

    report = export_onnx(checkpoints["center_crop"], tmp_path / "d.onnx")
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] <= 1e-4
    sizes = [*SIZES, (16, 200), (41, 39), (257, 31)]
    paths = write_pngs(tmp_path / "images", sizes)
    from masm.cli.main import main

    out = tmp_path / "detect.jsonl"
    assert main(["detect", str(checkpoints["center_crop"]), *map(str, paths), "--out", str(out)]) == 0
    detect = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    np.testing.assert_allclose(onnx_scores(tmp_path / "d.onnx", images), detect, atol=1e-4)
    model = onnx.load(str(tmp_path / "d.onnx"))  # the graph's model input equals the transform's exactly
    model.graph.output.append(onnx.ValueInfoProto(name="pixel_values"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    transform = build_transform(whole("center_crop"), train=False)
    for rgb in images:
        (pixels,) = session.run(["pixel_values"], {"image": rgb[None]})
        np.testing.assert_array_equal(pixels[0], transform(rgb).numpy())
    contract = json.loads((tmp_path / "d.preprocessing.json").read_text())
    assert contract["in_graph"][0].startswith("centre crop 32 x 32, no resize")


def test_onnx_export_of_tiles_is_refused_in_one_line(checkpoints, tmp_path):
    from masm.errors import MasmError
    from masm.inference import export_onnx

    with pytest.raises(
        MasmError, match=r"^ONNX export of a detector that scores images by tiles .* not supported"
    ):
        export_onnx(checkpoints["tiles"], tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


def test_explanation_matrices_place_each_crop_where_it_was_cut(checkpoints):
    from masm.explain.geometry import to_frame
    from masm.inference import Scorer

    scorer = Scorer(checkpoints["tiles"])
    matrices = scorer._input_matrices(70, 50)
    assert len(matrices) == 6
    frame = to_frame(
        np.ones((S, S), np.float32), matrices[-1], (70, 50)
    )  # the last tile: rows 38.., cols 18..
    expected = np.zeros((70, 50), np.float32)
    expected[38:, 18:] = 1.0
    np.testing.assert_array_equal(frame, expected)


def test_explain_puts_a_whole_image_map_where_its_crop_or_tiles_were_cut(checkpoints):
    import masm

    rgb = image(70, 50)
    detector = load_checkpoint(checkpoints["center_crop"])
    (framed,) = masm.explain(detector, [rgb])
    (crop_map,) = masm.explain(detector, build_transform(detector.preprocessing, train=False)(rgb)[None])
    expected = np.zeros((70, 50), np.float32)
    expected[19:51, 9:41] = crop_map  # the centre crop's window: top (70 - 32) // 2, left (50 - 32) // 2
    np.testing.assert_allclose(framed, expected, atol=1e-6)

    detector = load_checkpoint(checkpoints["tiles"])
    (framed,) = masm.explain(detector, [rgb])
    tile_maps = masm.explain(detector, build_transform(detector.preprocessing, train=False)(rgb))
    expected = np.zeros((70, 50), np.float32)
    for tile_map, (top, left) in zip(tile_maps, tile_origins(70, 50, S)):
        np.maximum(
            expected[top : top + S, left : left + S], tile_map, out=expected[top : top + S, left : left + S]
        )
    np.testing.assert_allclose(framed, expected, atol=1e-6)

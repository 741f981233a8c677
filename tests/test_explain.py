"""Explanation maps (issue 19): masm.explain, detect --explain, eval example sheets, synth regions, bench parts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import masm
from masm.explain import explain_batches
from masm.explain.localization import localization_scores, pixel_auc, pointing_hit, random_maps
from masm.models import BACKBONES, FaceCropConfig, Preprocessing, create_detector, save_checkpoint
from masm.models.families import FAMILIES

TINY = [name for name in BACKBONES if name.startswith("tiny-")]


def trained_like(name: str, preprocessing: Preprocessing | None = None, seed: int = 1):
    """A tiny MASM detector whose adapters and head moved away from their start (as after training)."""
    detector = create_detector(name, "masm", preprocessing=preprocessing)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in detector.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return detector.eval()


def test_maps_have_the_input_size_and_lie_in_unit_interval():
    detector = trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=None))
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 50, 3), (32, 32, 3), (70, 33, 3)]
    ]
    maps = masm.explain(detector, images)
    assert [m.shape for m in maps] == [(40, 50), (32, 32), (70, 33)]
    for m in maps:
        assert m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0 and m.max() > 0.5
    batch = masm.explain(detector, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert [m.shape for m in batch] == [(32, 32), (32, 32)]
    from masm.explain import explain

    assert np.array_equal(explain(detector, images)[1], maps[1])  # the package and the function agree
    with torch.inference_mode():  # as a service may call it
        assert all(np.array_equal(a, b) for a, b in zip(masm.explain(detector, images), maps))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["relevance", "grad-cam"])
def test_every_family_explains_and_merge_does_not_change_the_map(name, method):
    family = FAMILIES[BACKBONES[name].family]
    if family.requires:
        pytest.importorskip(family.requires)
    detector = trained_like(name)
    size = detector.preprocessing.input_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    attention_before = getattr(detector.backbone.config, "_attn_implementation", None)
    unmerged = explain_batches(detector, x, method=method)
    merged = explain_batches(copy.deepcopy(detector).merge(), x, method=method)
    maps = unmerged.maps
    assert maps.shape == (3, size, size) and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).amax(1) == 1).all()  # every image has evidence somewhere
    assert not torch.allclose(maps[0], maps[1])  # the map follows the input
    torch.testing.assert_close(merged.maps, maps, atol=2e-3, rtol=0)
    torch.testing.assert_close(unmerged.scores, detector.score(x), atol=1e-5, rtol=0)
    assert all(p.grad is None for p in detector.parameters())
    assert getattr(detector.backbone.config, "_attn_implementation", None) == attention_before


def test_map_of_an_aligned_face_lands_on_the_face_in_the_frame(tmp_path):
    """A map peaked at the nose of the alignment template, pulled back through the Scorer's own alignment
    and resize, peaks at the detected nose, inside the face box."""
    import skimage.data

    from masm.data.faces import align_template
    from masm.explain.outputs import frame_map
    from masm.inference import Input, Scorer, ScorerOptions

    astronaut = skimage.data.astronaut()
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    detector = trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=FaceCropConfig()))
    scorer = Scorer(detector, ScorerOptions(explain_dir=str(tmp_path / "maps")))
    job, crops = scorer.prepare(Input(str(path), "image"))
    assert len(crops) >= 1
    size = detector.preprocessing.input_size
    nose = align_template(256, 1.3)[2] * size / 256  # where the nose is in the model input
    yy, xx = np.mgrid[0:size, 0:size]
    peaked = np.exp(-((xx - nose[0]) ** 2 + (yy - nose[1]) ** 2) / 2.0).astype(np.float32)
    job.maps = [peaked] + [np.zeros_like(peaked)] * (len(crops) - 1)
    in_frame = frame_map(job, 0)
    assert in_frame.shape == astronaut.shape[:2]
    y, x = np.unravel_index(np.argmax(in_frame), in_frame.shape)
    face = scorer.aligner.detect(astronaut)[0]
    x0, y0, x1, y1 = face.box
    assert x0 <= x <= x1 and y0 <= y <= y1
    assert np.hypot(x - face.landmarks[2][0], y - face.landmarks[2][1]) < 8  # 8 px of a 512 px frame

    # The real maps take the same path: the overlay is the whole frame.
    result = next(scorer.score_paths([str(path)]))
    overlay = Image.open(result["explanation"])
    assert result["error"] is None and overlay.size == (512, 512)


def write_checkpoint(root: Path) -> Path:
    detector = trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=FaceCropConfig()))
    return save_checkpoint(detector, root / "ckpt")


def test_cli_explain_writes_overlays_and_a_contact_sheet_and_goes_on_after_bad_input(tmp_path):
    import skimage.data

    from data_fixtures import astronaut_frames, write_video
    from test_inference_detect import run_cli

    checkpoint = write_checkpoint(tmp_path)
    image = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(image)
    video = write_video(tmp_path / "clip.mp4", astronaut_frames(n=5))
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a JPEG\n")
    maps, out = tmp_path / "maps", tmp_path / "results.jsonl"
    proc = run_cli(
        "detect", str(checkpoint), str(bad), str(image), str(video), str(tmp_path / "missing.png"),
        "--explain", str(maps), "--frames", "3", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 of 4 inputs could not be scored" in proc.stderr
    results = {Path(r["input"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    for name in ("notes.jpg", "missing.png"):
        error = results[name]["error"]
        assert error and "\n" not in error and name in error and "explanation" not in results[name]
    still = results["astronaut.png"]
    assert still["error"] is None and Image.open(still["explanation"]).size == (512, 512)
    clip = results["clip.mp4"]
    assert clip["error"] is None and clip["frames"] == 3 and len(clip["frame_explanations"]) == 3
    assert Path(clip["explanation"]).name.endswith("-sheet.png") and Path(clip["explanation"]).is_file()
    assert all(Image.open(p).size == (256, 256) for p in clip["frame_explanations"])


def test_without_explain_nothing_is_hooked_and_no_key_is_added(tmp_path):
    from masm.inference import Scorer

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    scorer = Scorer(trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=None)))
    result = next(scorer.score_paths([str(path)]))
    assert scorer.explainer is None and "explanation" not in result and result["error"] is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in scorer.model.modules())
    assert scorer.model.backbone.config._attn_implementation == "sdpa"


def test_synth_regions_change_no_crop_and_cover_the_forgery(tmp_path):
    from masm.data import synth
    from masm.data.spec import open_dataset

    settings = dict(families=["blend", "noise"], per_family=3, num_real=2, size=32, seed=5, progress=False)
    plain = synth.synthesize(tmp_path / "plain", **settings)
    masked = synth.synthesize(tmp_path / "masked", masks=True, **settings)
    assert masked["masks"] and not plain["masks"]
    for file in sorted((tmp_path / "plain").rglob("*.png")):
        twin = tmp_path / "masked" / file.relative_to(tmp_path / "plain")
        assert np.array_equal(np.asarray(Image.open(file)), np.asarray(Image.open(twin)))
    region = np.asarray(Image.open(tmp_path / "masked" / "masks" / "blend" / "000000.png")) / 255
    assert 0.1 < (region >= 0.5).mean() < 0.8
    assert len(open_dataset(f"folder:{tmp_path / 'masked'}", frames_per_video=1).records) == 8


def test_bench_regenerates_the_demo_fakes_with_their_regions(tmp_path):
    from masm.benchmarks.explain_maps import forged_with_regions, goal_verdict
    from masm.data import synth
    from masm.demo.photos import demo_photos
    from masm.errors import MasmError

    split = tmp_path / "test"
    photos = demo_photos()[0]
    synth.synthesize(
        split, photos=photos, families=["blend"], per_family=3, size=32, seed=7, strength=5.0, progress=False
    )
    images, masks = forged_with_regions(split)
    assert len(images) == 3 and masks.shape == (3, 32, 32) and masks.dtype == bool
    Image.fromarray(255 - images[1]).save(split / "fake" / "blend" / "000001.png")
    with pytest.raises(MasmError, match="000001.png: regenerated crop differs"):
        forged_with_regions(split)

    def row(auc, std):
        return {"pixel_auc": {"mean": auc, "std": std}, "pointing_game": {"mean": 0.0, "std": 0.0}}

    summary = {"attention relevance": row(0.8, 0.02), "input gradient": row(0.5, 0.01)}
    summary |= {"random": row(0.5, 0.0), "uniform": row(0.5, 0.0)}
    assert goal_verdict(summary)["met"]
    summary["input gradient"] = row(0.7, 0.11)  # closer than its spread
    assert not goal_verdict(summary)["met"]


def test_localization_scores_and_random_baseline():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    assert pixel_auc(mask.astype(float), mask) == 1.0 and pixel_auc(1.0 - mask, mask) == 0.0
    assert pixel_auc(np.full((8, 8), 0.3), mask) == 0.5 and pixel_auc(mask, np.ones((8, 8))) is None
    assert pointing_hit(np.full((8, 8), 0.3), mask) == pytest.approx(mask.mean())  # ties: area share
    peak = np.zeros((8, 8))
    peak[3, 4] = 1.0
    assert pointing_hit(peak, mask) == 1.0 and pointing_hit(1 - mask.astype(float), mask) == 0.0
    noise = random_maps(4, 2, 8, seed=0)
    assert noise.shape == (4, 8, 8) and noise.min() >= 0 and noise.max() <= 1
    scores = localization_scores(np.stack([mask, ~mask]).astype(float), np.stack([mask, mask]))
    assert scores == {"pixel_auc": 0.5, "pointing_game": 0.5, "images": 2}


def test_eval_report_shows_top_fakes_false_alarms_and_misses_with_maps(tmp_path):
    from masm.data import synth
    from masm.explain.evaluate import evaluate_detector

    synth.synthesize(tmp_path / "data", families=["blend"], per_family=5, num_real=5, size=32, progress=False)
    detector = trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=None))
    result = evaluate_detector(
        detector,
        [f"folder:{tmp_path / 'data'}"],
        out_dir=tmp_path / "eval",
        frames=1,
        progress=False,
        examples=2,
    )
    report = json.loads(Path(result["report"]).read_text())
    (entry,) = report["examples"].values()
    assert (tmp_path / "eval" / entry["sheet"]).is_file()
    from masm.explain.examples import GROUPS

    fakes, alarms, misses = (entry[group] for group in GROUPS)
    assert len(fakes) == len(alarms) == len(misses) == 2
    assert fakes[0]["score"] >= fakes[1]["score"] >= misses[1]["score"] >= misses[0]["score"]
    assert (
        "/real/" in alarms[0]["path"]
        and "Where the detector looks" in (tmp_path / "eval" / "report.md").read_text()
    )


def test_an_explanation_that_cannot_be_written_is_that_inputs_one_line_error(tmp_path):
    from masm.inference import Scorer, ScorerOptions

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(paths[-1])
    blocked = tmp_path / "maps"
    blocked.write_text("a file where the folder should be")
    detector = trained_like("tiny-clip", Preprocessing(input_size=32, face_crop=None))
    results = list(Scorer(detector, ScorerOptions(explain_dir=str(blocked))).score_paths(paths))
    assert len(results) == 2
    for path, result in zip(paths, results):
        assert (
            result["error"].startswith(f"{path}: cannot write its explanation")
            and "\n" not in result["error"]
        )

"""Pseudo-fakes made on the fly: determinism per seed, face-shaped regions, global statistics near chance,
and a detector trained from real frames alone through the trainer."""

from __future__ import annotations

import numpy as np
import pytest

from masm.data import synth
from masm.data.pseudo_fakes import PseudoFakeConfig, PseudoFakeMaker, face_region
from masm.errors import ConfigError


def _crops(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    photos = synth.skimage_photos()
    return [
        synth.to_uint8(synth.random_crop(photos, np.random.default_rng([seed, i]), size)) for i in range(n)
    ]


def _maker(**kwargs) -> PseudoFakeMaker:
    config = PseudoFakeConfig(**{"probability": 1.0, "region": "random", **kwargs})
    return PseudoFakeMaker(config, donors=synth.skimage_photos())


def test_same_seed_same_forgery_other_seed_another():
    maker = _maker(families=list(synth.FAMILIES), strength=3.0, post_process=True)
    crop = _crops(1, 0)[0]
    first = maker(crop, np.random.default_rng([1, 2, 3]))
    again = maker(crop, np.random.default_rng([1, 2, 3]))
    other = maker(crop, np.random.default_rng([1, 2, 4]))
    assert first[1] == 1 and first[2] in synth.FAMILIES
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    assert not np.array_equal(first[0], other[0])


def test_probability_decides_the_label_and_reals_pass_unchanged_without_post_processing():
    crops = _crops(200, 1)
    maker = _maker(probability=0.3, families=["blend", "noise"])
    labels = []
    for i, crop in enumerate(crops):
        out, label, family = maker(crop, np.random.default_rng(i))
        labels.append(label)
        if label == 0:
            assert family is None and np.array_equal(out, crop)
        else:
            assert family in ("blend", "noise") and not np.array_equal(out, crop)
    assert 0.2 < np.mean(labels) < 0.4


def test_config_rejects_bad_values_and_splice_needs_donors():
    with pytest.raises(ConfigError, match="probability"):
        PseudoFakeConfig(probability=1.5)
    with pytest.raises(ConfigError, match="nope"):
        PseudoFakeConfig(probability=0.5, families=["blend", "nope"])
    with pytest.raises(ConfigError, match="splice"):
        PseudoFakeMaker(PseudoFakeConfig(probability=0.5, families=["splice"], region="random"))


def test_face_region_follows_the_landmarks_of_a_real_face():
    import skimage.data

    from masm.data.transforms import resize_square

    face = resize_square(skimage.data.astronaut(), 224)
    maker = _maker(families=["blend"], region="face")
    points = maker._landmarks(face)
    assert points is not None and points.shape == (68, 2)
    region = face_region(points, 224, np.random.default_rng(0))[..., 0]
    inside = region[
        np.round(points[:, 1]).astype(int).clip(0, 223), np.round(points[:, 0]).astype(int).clip(0, 223)
    ]
    assert inside.mean() > 0.4  # the landmarks lie in (or on the feathered edge of) the blended region
    assert region[:10].max() < 0.05 and region[:, :10].max() < 0.05  # far from the face: untouched
    out, label, _ = maker(face, np.random.default_rng(0))
    assert label == 1
    changed = np.abs(out.astype(int) - face).sum(-1) > 0
    assert changed[int(points[:, 1].mean()), int(points[:, 0].mean())] and not changed[:10].any()
    # a frame without a face stays real in "face" mode
    sky = np.full((64, 64, 3), 120, np.uint8)
    assert maker(sky, np.random.default_rng(0))[1] == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", list(synth.FAMILIES))
def test_global_statistics_of_online_pseudo_fakes_stay_near_chance(family):
    from masm.demo.experiment import DEMO_STRENGTH
    from test_synth import GLOBAL_AUC_MAX, cv_auc, global_features, logistic

    maker = _maker(families=[family], strength=DEMO_STRENGTH, post_process=True)
    plain = _maker(probability=0.0, families=[family], strength=DEMO_STRENGTH, post_process=True)
    fakes = np.stack([maker(c, np.random.default_rng([7, i]))[0] for i, c in enumerate(_crops(150, 2))])
    reals = np.stack([plain(c, np.random.default_rng([8, i]))[0] for i, c in enumerate(_crops(150, 3))])
    auc = cv_auc(global_features(reals / 255.0), global_features(fakes / 255.0), logistic())
    assert auc <= GLOBAL_AUC_MAX


def test_trainer_learns_from_real_frames_alone_with_pseudo_fakes(tmp_path):
    from masm.data.spec import open_dataset
    from masm.training import train
    from masm.training.config import train_config_from_dict

    synth.synthesize(
        tmp_path / "reals", per_family=0, num_real=24, size=32, seed=0, progress=False, post=False
    )
    val = tmp_path / "val"
    synth.synthesize(val, families=["blend"], per_family=6, size=32, seed=1, progress=False)
    base = {
        "model": {
            "backbone": "tiny-clip",
            "method": {"name": "masm"},
            "preprocessing": {"face_crop": None, "input_size": 32},
        },
        "data": {
            "train": f"folder:{tmp_path / 'reals'}",
            "val": f"folder:{val}",
            "batch_size": 8,
            "num_workers": 0,
            "augment": {"enabled": False},
        },
        "max_steps": 3,
        "epochs": 1,
        "eval_unit": "step",
        "eval_every": 3,
        "checkpoint_every": 0,
    }
    from masm.errors import DataError

    with pytest.raises(DataError, match="only real frames.*pseudo_fakes"):
        train(train_config_from_dict(base), tmp_path / "no-fakes", progress=False)
    base["data"]["pseudo_fakes"] = {"probability": 0.5, "families": ["blend"], "region": "random"}
    config = train_config_from_dict(base)
    result = train(config, tmp_path / "run", progress=False)
    assert result.best_checkpoint.is_dir()
    # the trainer saw both classes: its training frames are reals turned into pseudo-fakes on the fly
    from masm.data.transforms import build_transform
    from masm.models.preprocessing import Preprocessing
    from masm.training.data import TrainFrames

    records = open_dataset(f"folder:{tmp_path / 'reals'}").records
    frames = TrainFrames(
        records, build_transform(Preprocessing(input_size=32), train=False), 0, config.data.pseudo_fakes
    )
    labels = [int(frames[i]["label"]) for i in range(len(records))]
    assert 0 < sum(labels) < len(labels)
    assert [int(frames[i]["label"]) for i in range(len(records))] == labels  # same seed, same epoch


def test_real_only_drops_the_training_sets_own_fakes(tmp_path):
    from masm.training.config import train_config_from_dict
    from masm.training.data import open_run_data

    synth.synthesize(tmp_path / "ds", families=["noise"], per_family=5, num_real=7, size=32, progress=False)
    data = {"train": f"folder:{tmp_path / 'ds'}", "val": "none"}
    config = train_config_from_dict({"data": data})
    assert {r.label for r in open_run_data(config, None, None, None).train.records} == {0, 1}
    data["pseudo_fakes"] = {"probability": 0.5, "families": ["blend"], "real_only": True}
    train = open_run_data(train_config_from_dict({"data": data}), None, None, None).train
    assert len(train.records) == 7 and {r.label for r in train.records} == {0}

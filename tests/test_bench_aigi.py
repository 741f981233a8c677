"""``masm bench aigi``: the offline generators differ and each leaves a trace, reruns give the same bits, the
data sets are what they say, and a tiny run writes its JSON and tables (issue 30)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from masm.benchmarks.aigi import command
from masm.benchmarks.aigi.data import AigiDataSettings, prepare_aigi_data, real_crops
from masm.benchmarks.aigi.generators import (
    GENERATORS,
    Autoencoder,
    ensure_generator,
    recipe_for,
    reconstruct,
    train_generator,
)
from masm.benchmarks.aigi.report import summarize
from masm.benchmarks.aigi.runs import generator_metrics
from masm.cli.main import main
from masm.demo.photos import demo_photos
from masm.errors import ConfigError

SIZE = 32
TINY = {"steps": 40, "batch_size": 8, "width": 8, "size": SIZE}  # half a second per generator


@pytest.fixture(scope="module")
def photos():
    return demo_photos()[0]


@pytest.fixture(scope="module")
def fakes(photos):
    """Each generator's reconstructions of the same 48 held-out real crops, and the crops."""
    reals = real_crops(photos, seed=0, stream=13, count=48, size=SIZE)
    return reals, {
        name: reconstruct(train_generator(recipe_for(name, **TINY), photos), reals) for name in GENERATORS
    }


def _spectrum(images) -> np.ndarray:
    """log |FFT| of the grey image, pooled to 8 x 8: what an upsampler's trace shows in."""
    grey = np.stack(images).astype(np.float32).mean(-1)
    amplitude = np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)))
    return np.log(amplitude.reshape(len(grey), 8, SIZE // 8, 8, SIZE // 8).mean((2, 4)) + 1e-3).reshape(
        len(grey), -1
    )


def test_the_decoders_upsample_as_named():
    kinds = {
        name: {type(m).__name__ for m in Autoencoder(recipe_for(name, **TINY)).decoder.modules()}
        for name in GENERATORS
    }
    assert "ConvTranspose2d" in kinds["tconv"] and "ConvTranspose2d" in kinds["tconv-x8"]
    assert "PixelShuffle" in kinds["shuffle"] and "ConvTranspose2d" not in kinds["shuffle"]
    modes = {
        name: {
            m.mode
            for m in Autoencoder(recipe_for(name, **TINY)).decoder.modules()
            if isinstance(m, torch.nn.Upsample)
        }
        for name in GENERATORS
    }
    assert modes == {
        "tconv": set(),
        "nearest": {"nearest"},
        "bilinear": {"bilinear"},
        "shuffle": set(),
        "tconv-x8": set(),
    }
    # x4 vs x8: the latent side, with as many latent values
    for name, side in (("tconv", SIZE // 4), ("tconv-x8", SIZE // 8)):
        latent = Autoencoder(recipe_for(name, **TINY)).encoder(torch.zeros(1, 3, SIZE, SIZE))
        assert latent.shape[-1] == side and latent[0].numel() == SIZE * SIZE // 2


def test_the_generators_differ_and_each_leaves_a_trace(fakes):
    """A logistic probe on the amplitude spectrum tells each generator's fakes from the reals and from every
    other generator's fakes of the same crops."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reals, made = fakes
    labels = np.r_[np.zeros(len(reals)), np.ones(len(reals))]

    def separable(a, b) -> float:
        features = np.r_[_spectrum(a), _spectrum(b)]
        return cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression()), features, labels, cv=4
        ).mean()

    names = list(made)
    for i, a in enumerate(names):
        assert separable(reals, made[a]) >= 0.9, a
        for b in names[i + 1 :]:
            assert np.abs(np.stack(made[a]).astype(float) - np.stack(made[b])).mean() > 2.0, (a, b)
            assert separable(made[a], made[b]) >= 0.9, (a, b)


def test_a_generator_trains_to_the_same_bits_and_leaves_the_callers_rng_and_threads(photos):
    recipe = recipe_for("shuffle", **TINY)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    first, second = train_generator(recipe, photos), train_generator(recipe, photos)
    assert torch.equal(torch.rand(3), expected_next) and torch.get_num_threads() == threads
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    reals = real_crops(photos, seed=0, stream=13, count=6, size=SIZE)
    assert all(np.array_equal(x, y) for x, y in zip(reconstruct(first, reals), reconstruct(second, reals)))
    other_seed = train_generator(recipe_for("shuffle", **TINY, seed=1), photos)
    assert not torch.equal(other_seed.decoder[-1].weight, first.decoder[-1].weight)


def test_a_trained_generator_is_cached_by_its_recipe(tmp_path, photos, monkeypatch):
    recipe = recipe_for("nearest", **TINY)
    made = ensure_generator(tmp_path, "nearest", recipe, photos)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith(f"nearest-{recipe.key()}-") and files[0].endswith(".json")

    def no_training(*args):
        raise AssertionError("the cached generator should have been loaded")

    monkeypatch.setattr("masm.benchmarks.aigi.generators.train_generator", no_training)
    loaded = ensure_generator(tmp_path, "nearest", recipe, photos)
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(AssertionError, match="cached generator"):  # another recipe is another file
        ensure_generator(tmp_path, "nearest", recipe_for("nearest", **{**TINY, "steps": 41}), photos)


def test_the_data_sets_hold_what_they_say_and_a_rerun_writes_the_same_bytes(tmp_path):
    settings = AigiDataSettings(
        train_generator="bilinear",
        generators=("tconv",),
        train_reals=6,
        eval_per_generator=4,
        size=SIZE,
        generator_steps=3,
    )
    first = prepare_aigi_data(tmp_path / "a", settings)
    second = prepare_aigi_data(tmp_path / "b", settings)
    assert first.generators == ["bilinear", "tconv"] and first.test_generators == ["tconv"]

    def count(index, label, family=None):
        return sum(r.label == label and r.family == family for r in index.records)

    assert (count(first.train, 0), count(first.train, 1, "bilinear"), len(first.train.records)) == (6, 6, 12)
    assert (count(first.val, 0), count(first.val, 1, "bilinear"), len(first.val.records)) == (4, 4, 8)
    assert (count(first.test, 0), count(first.test, 1, "bilinear"), count(first.test, 1, "tconv")) == (
        4,
        4,
        4,
    )
    for a, b in zip(first.test.records + first.train.records, second.test.records + second.train.records):
        assert open(a.path, "rb").read() == open(b.path, "rb").read()
    # the sets' reals are different crops; a fake is the reconstruction of its set's real of the same number
    train_real = {open(r.path, "rb").read() for r in first.train.records if r.label == 0}
    assert not train_real & {open(r.path, "rb").read() for r in first.test.records if r.label == 0}
    # a second call reuses what is there (same files, not rewritten)
    stamp = first.test.records[0].path
    before = (tmp_path / "a" / "data" / "test" / "recipe.json").stat().st_mtime_ns, open(stamp, "rb").read()
    again = prepare_aigi_data(tmp_path / "a", settings)
    assert (tmp_path / "a" / "data" / "test" / "recipe.json").stat().st_mtime_ns == before[0]
    assert [r.path for r in again.test.records] == [r.path for r in first.test.records]


def test_bad_generator_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown generator 'gan'; choose from tconv, nearest"):
        AigiDataSettings(generators=("gan",))
    with pytest.raises(ConfigError, match="unknown generator 'vae'"):
        AigiDataSettings(train_generator="vae")
    with pytest.raises(ConfigError, match="train_reals and eval_per_generator must be >= 2"):
        AigiDataSettings(train_reals=1)
    assert command.GENERATOR_NAMES == tuple(GENERATORS)  # the parser's list, kept free of torch


def test_metrics_per_generator_and_their_mean_over_the_unseen_ones(tmp_path):
    settings = AigiDataSettings(train_generator="tconv", generators=("nearest", "bilinear"))
    splits = type(
        "S", (), {"generators": ["tconv", "nearest", "bilinear"], "test_generators": ["nearest", "bilinear"]}
    )
    frame = lambda auc: {"frame": {"acc": auc - 0.1, "ap": auc - 0.05, "auc": auc, "eer": 0.3}}  # noqa: E731
    result = {"families": {"tconv": frame(0.99), "nearest": frame(0.8), "bilinear": frame(0.6)}}
    per_generator, mean = generator_metrics(result, splits)
    assert per_generator["tconv"] == {"acc": pytest.approx(0.89), "ap": pytest.approx(0.94), "auc": 0.99}
    assert mean == {"acc": pytest.approx(0.6), "ap": pytest.approx(0.65), "auc": pytest.approx(0.7)}
    assert settings.checked_generators() == ["tconv", "nearest", "bilinear"]
    runs = [
        {
            "method": "masm",
            "seed": s,
            "generators": {"tconv": {"acc": a, "ap": a, "auc": a}},
            "mean_unseen": {"acc": a, "ap": a, "auc": a},
            "trainable_params": 10,
            "train_seconds": 2.0,
            "attn_weight_change": 0.1,
        }
        for s, a in enumerate((0.5, 0.7, 0.9))
    ]
    summary = summarize(runs)["masm"]
    assert summary["n"] == 3 and summary["generators"]["tconv"]["auc"]["mean"] == pytest.approx(0.7)
    assert summary["mean_unseen"]["ap"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))


def _tiny_bench(out, work) -> list[str]:
    argv = ["bench", "aigi", "--out", str(out), "--work", str(work), "--steps", "3", "--seeds", "1"]
    argv += [
        "--methods",
        "masm",
        "--train-reals",
        "16",
        "--eval-per-generator",
        "8",
        "--generator-steps",
        "3",
    ]
    return argv + ["--generators", "nearest", "--backbone", "tiny-clip", "--size", str(SIZE), "--no-progress"]


def test_bench_aigi_writes_its_json_and_tables(tmp_path, capsys):
    out = tmp_path / "aigi.json"
    argv = _tiny_bench(out, tmp_path / "work")
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "summary", "runs"}
    meta = result["meta"]
    assert meta["train_generator"] == "tconv" and meta["test_generators"] == ["nearest"]
    assert (
        set(meta["generators"]) == {"tconv", "nearest"} and meta["generators"]["tconv"]["decoder"] == "tconv"
    )
    assert meta["command"].startswith("masm bench aigi --seeds 1")
    (run,) = result["runs"]
    assert (run["method"], run["seed"]) == ("masm", 0)
    assert set(run["generators"]) == {"tconv", "nearest"} and set(run["mean_unseen"]) == {"acc", "ap", "auc"}
    assert run["mean_unseen"] == run["generators"]["nearest"]  # one unseen generator: its own numbers
    for metrics in run["generators"].values():
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    summary = result["summary"]["masm"]
    assert summary["n"] == 1 and summary["generators"]["nearest"]["auc"] == {
        "mean": run["generators"]["nearest"]["auc"],
        "std": 0.0,
    }
    table = (tmp_path / "aigi.md").read_text()
    assert "| method | tconv (train) | nearest | mean unseen |" in table and "**accuracy @ 0.5**" in table
    assert "wrote " + str(out) in capsys.readouterr().out
    # a rerun from scratch (generators, data, detector) gives the same numbers
    assert main(_tiny_bench(tmp_path / "again.json", tmp_path / "work2")) == 0
    again = json.loads((tmp_path / "again.json").read_text())["runs"][0]
    assert (again["generators"], again["val_auc"]) == (run["generators"], run["val_auc"])


def test_bench_aigi_rejects_an_unknown_method(tmp_path, capsys):
    argv = [
        "bench",
        "aigi",
        "--out",
        str(tmp_path / "a.json"),
        "--work",
        str(tmp_path),
        "--methods",
        "masm,gan",
    ]
    assert main(argv) != 0
    assert "unknown method 'gan'; choose from masm" in capsys.readouterr().err

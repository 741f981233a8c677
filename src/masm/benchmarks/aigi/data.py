"""The benchmark's data: real photo crops and the generators' reconstructions of the same crops.

Three folder datasets under ``WORK/data`` (``real/`` and ``fake/<generator>/``, as ``folder:`` reads them):

* ``train``: ``train_reals`` real crops and the training generator's reconstruction of each of them;
* ``val``: new crops and their reconstructions by the training generator (checkpoint selection sees no
  other generator);
* ``test``: new crops and their reconstructions by EVERY generator, the training one included (its
  held-out fakes, the in-distribution score).

A fake is the reconstruction of a real crop of the same set, so real and fake share their content and only
the generator's trace separates them. The crops the generators were trained on come from their own RNG
stream (:data:`.generators.TRAIN_CROP_STREAM`) and are in none of the sets. Every crop has its own RNG,
derived from ``(seed, set, index)``, and each set is stored losslessly (PNG) with a ``recipe.json``: a set
whose recipe did not change is reused as it is.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...data.index import FrameIndex
from ...data.spec import open_dataset
from ...data.synth import random_crop, sample_rng, save_png, to_uint8
from ...errors import ConfigError
from .generators import GENERATORS, check_generators, ensure_generator, generator_file, recipe_for

# RNG streams of the real crops of each set (the generators train on stream 10).
STREAMS = {"train": 11, "val": 12, "test": 13}


@dataclass(frozen=True)
class AigiDataSettings:
    """What the benchmark's data is made of: generators, sizes, seed."""

    train_generator: str = "tconv"
    generators: tuple[str, ...] = tuple(GENERATORS)  # tested on all of them; the training one is added
    train_reals: int = 4000  # real training crops, each with its reconstruction: twice as many images
    eval_per_generator: int = 150  # real crops of val and test, and fakes per generator of each
    size: int = 64
    seed: int = 0
    generator_steps: int = 400  # optimizer steps of each generator's autoencoder

    def checked_generators(self) -> list[str]:
        """The generators tested, the training one first."""
        check_generators([self.train_generator])
        return check_generators([self.train_generator, *self.generators])

    def __post_init__(self) -> None:
        if self.train_reals < 2 or self.eval_per_generator < 2:
            raise ConfigError(
                f"train_reals and eval_per_generator must be >= 2, got {self.train_reals} and "
                f"{self.eval_per_generator}"
            )
        self.checked_generators()


@dataclass
class AigiSplits:
    train: FrameIndex  # reals + the training generator's fakes
    val: FrameIndex  # the same, other crops
    test: FrameIndex  # reals + every generator's fakes (family = generator)
    train_generator: str
    generators: list[str]  # every generator tested, the training one first
    recipes: dict[str, dict]  # generator -> its recipe and cached weights
    root: Path

    @property
    def test_generators(self) -> list[str]:
        """The generators never seen in training (or in checkpoint selection)."""
        return [g for g in self.generators if g != self.train_generator]

    def describe(self) -> str:
        counts = self.test.summary()
        return (
            f"train {len(self.train.records)} crops (real + {self.train_generator} reconstructions of them), "
            f"val {len(self.val.records)}, test {counts['frames']['real']} real crops + "
            + ", ".join(f"{g} {v['frames']}" for g, v in counts["families"].items())
            + f" fakes (training generator: {self.train_generator})"
        )


def real_crops(
    photos: Sequence[np.ndarray], seed: int, stream: int, count: int, size: int
) -> list[np.ndarray]:
    """``count`` real uint8 crops of ``photos``, crop ``i`` drawn from its own RNG ``(seed, stream, i)``."""
    return [to_uint8(random_crop(photos, sample_rng(seed, stream, i), size)) for i in range(count)]


def prepare_aigi_data(root: str | Path, settings: AigiDataSettings, progress: bool = False) -> AigiSplits:
    """Train (or load) the generators into ``root/generators``, write (or reuse) the three sets under
    ``root/data`` and return them."""
    from ...demo.photos import demo_photos

    root = Path(root)
    photos = demo_photos()[0]
    generators = settings.checked_generators()
    recipes = {
        name: recipe_for(name, steps=settings.generator_steps, size=settings.size, seed=settings.seed)
        for name in generators
    }
    models: dict = {}

    def model(name: str):  # trained or loaded only when a set has to be made
        if name not in models:
            if progress:
                print(
                    f"generator {name}: {recipes[name].steps} steps (cached in {root / 'generators'})",
                    file=sys.stderr,
                    flush=True,
                )
            models[name] = ensure_generator(root / "generators", name, recipes[name], photos)
        return models[name]

    n_eval = settings.eval_per_generator
    plan = {
        "train": (settings.train_reals, [settings.train_generator]),
        "val": (n_eval, [settings.train_generator]),
        "test": (n_eval, generators),
    }
    indexes = {}
    for name, (reals, fakes_of) in plan.items():
        folder = root / "data" / name
        recipe = {
            "size": settings.size,
            "seed": settings.seed,
            "stream": STREAMS[name],
            "reals": reals,
            "generators": {g: generator_file("", g, recipes[g], photos).name for g in fakes_of},
        }
        if _read_recipe(folder) != recipe:
            _write_set(
                folder,
                recipe,
                real_crops(photos, settings.seed, STREAMS[name], reals, settings.size),
                {g: model(g) for g in fakes_of},
            )
        index = open_dataset(f"folder:{folder}", frames_per_video=1)
        indexes[name] = FrameIndex(f"aigi-{name}", index.records, index.source)
    return AigiSplits(
        train=indexes["train"],
        val=indexes["val"],
        test=indexes["test"],
        train_generator=settings.train_generator,
        generators=generators,
        recipes={
            g: {
                **asdict(recipes[g]),
                "weights": str(generator_file(root / "generators", g, recipes[g], photos)),
            }
            for g in generators
        },
        root=root,
    )


def _read_recipe(folder: Path) -> dict | None:
    marker = folder / "recipe.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _write_set(folder: Path, recipe: dict, reals: list[np.ndarray], generators: dict) -> None:
    """Write ``reals`` and each generator's reconstructions of them; the recipe goes last, so a set cut
    short is made again next time."""
    from .generators import reconstruct

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "real").mkdir(parents=True)
    for i, crop in enumerate(reals):
        save_png(crop, folder / "real" / f"{i:06d}.png")
    for name, model in generators.items():
        (folder / "fake" / name).mkdir(parents=True)
        for i, fake in enumerate(reconstruct(model, reals)):
            save_png(fake, folder / "fake" / name / f"{i:06d}.png")
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")

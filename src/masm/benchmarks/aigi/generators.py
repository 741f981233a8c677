"""The benchmark's image generators: small convolutional autoencoders whose decoders upsample differently.

No generated images can be downloaded where masm runs, so the "generators" are made here, from the demo's
real photographs: each autoencoder is trained for a short fixed budget to reconstruct real crops, and its
reconstructions of crops it never saw are the fakes (as detectors of latent-diffusion images are trained on
the reconstructions of real images by the generator's own autoencoder). All share one encoder design; what
separates them is how the decoder upsamples, which is what leaves a generator's trace in its pixels:

* ``tconv``: transposed convolution (kernel 4, stride 2), the classic source of checkerboard traces;
* ``nearest``: nearest-neighbour upsampling, then a 3x3 convolution;
* ``bilinear``: bilinear upsampling, then a 3x3 convolution;
* ``shuffle``: a 3x3 convolution to four times the channels, then pixel shuffle (sub-pixel convolution);
* ``tconv-x8``: the transposed convolution again, from a latent downsampled x8 instead of x4 (the same
  number of latent values: four times the channels).

Each is trained to match the crops' pixels and their log-amplitude spectrum (so its fakes are about as
sharp as real crops, as a generator's are). Training and reconstruction run in one thread under a forked RNG with a fixed seed, so one recipe gives the
same bits on a machine every time; trained weights are cached under ``--work``, keyed by their recipe, so
reruns (and other CPUs) reuse the very same generators.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...data.synth import random_crop, sample_rng, to_uint8
from ...errors import ConfigError

DECODERS = ("tconv", "nearest", "bilinear", "shuffle")
# Name -> (decoder, downsampling factor of the latent). The first is the default training generator.
GENERATORS: dict[str, tuple[str, int]] = {
    "tconv": ("tconv", 4),
    "nearest": ("nearest", 4),
    "bilinear": ("bilinear", 4),
    "shuffle": ("shuffle", 4),
    "tconv-x8": ("tconv", 8),
}
# The RNG stream of the crops every autoencoder trains on (the data's own streams are in .data).
TRAIN_CROP_STREAM = 10


@dataclass(frozen=True)
class GeneratorRecipe:
    """Everything that determines a trained generator; its :meth:`key` names the cached weights."""

    decoder: str
    downsample: int = 4  # latent side = crop side / downsample
    width: int = 32  # channels of every hidden layer
    # Latent channels at x4, times 4 per further halving: x4 is 16 x 16 x 8 at 64 px, x8 is 8 x 8 x 32, the
    # same 2048 values (a sixth of the pixels'): only the geometry of the latent differs.
    latent_channels_x4: int = 8
    steps: int = 400  # Adam steps on fresh real crops; 30-60 s in one CPU thread at 64 px
    batch_size: int = 16
    lr: float = 2e-3
    # An L1 loss on log |FFT| besides the pixels': without it the fakes are mostly blurrier than the reals
    # and sharpness alone told them apart (AUC 0.90-0.95, and a spectral probe trained on one generator
    # found all the others at AUC 0.999). With weight 10 their sharpness nears the reals' (AUC 0.72-0.88)
    # and each decoder's own trace is what is left to learn.
    spectrum_weight: float = 10.0
    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder {self.decoder!r}; choose from {', '.join(DECODERS)}")
        if self.downsample not in (2, 4, 8, 16) or self.size % self.downsample:
            raise ConfigError(
                f"downsample must be 2, 4, 8 or 16 and divide size {self.size}, got {self.downsample}"
            )
        if self.steps < 0:
            raise ConfigError(f"generator steps must be >= 0, got {self.steps}")

    @property
    def latent_channels(self) -> int:
        return max(1, self.latent_channels_x4 * self.downsample**2 // 16)

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_generators(names: Sequence[str]) -> list[str]:
    """``names`` in order, each known (a one-line error lists them otherwise), without repeats."""
    unknown = [n for n in names if n not in GENERATORS]
    if unknown:
        raise ConfigError(f"unknown generator {unknown[0]!r}; choose from {', '.join(GENERATORS)}")
    if not names:
        raise ConfigError(f"no generator given; choose from {', '.join(GENERATORS)}")
    return list(dict.fromkeys(names))


def recipe_for(name: str, **settings) -> GeneratorRecipe:
    """The recipe of generator ``name`` (:data:`GENERATORS`), ``settings`` (steps, size, seed...) on top."""
    decoder, downsample = GENERATORS[check_generators([name])[0]]
    return replace(GeneratorRecipe(decoder=decoder, downsample=downsample), **settings)


def _upsampler(decoder: str, width: int) -> nn.Module:
    """One x2 upsampling step of ``decoder``, ``width`` channels in and out."""
    if decoder == "tconv":
        return nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1)
    if decoder == "shuffle":
        return nn.Sequential(nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2))
    upsample = nn.Upsample(
        scale_factor=2, mode=decoder, **({"align_corners": False} if decoder == "bilinear" else {})
    )
    return nn.Sequential(upsample, nn.Conv2d(width, width, 3, padding=1))


class Autoencoder(nn.Module):
    """Strided-convolution encoder to a small latent, decoder upsampling the recipe's way; RGB in [0, 1]."""

    def __init__(self, recipe: GeneratorRecipe):
        super().__init__()
        width, levels = recipe.width, int(math.log2(recipe.downsample))
        encoder: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(levels):
            encoder += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
        encoder.append(nn.Conv2d(width, recipe.latent_channels, 1))
        decoder: list[nn.Module] = [nn.Conv2d(recipe.latent_channels, width, 1), nn.ReLU()]
        for _ in range(levels):
            decoder += [_upsampler(recipe.decoder, width), nn.ReLU()]
        decoder.append(nn.Conv2d(width, 3, 3, padding=1))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(images)))


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """One intra-op thread and ``seed`` for torch's RNG, both restored afterwards: the same bits each time
    (a multi-threaded reduction may sum in another order), and the caller's RNG stream left alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _as_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """float32 H x W x 3 arrays in [0, 1] (or uint8) -> N x 3 x H x W tensor in [0, 1]."""
    array = np.stack(
        [np.asarray(i, dtype=np.float32) / (255.0 if i.dtype == np.uint8 else 1.0) for i in images]
    )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_generator(recipe: GeneratorRecipe, photos: Sequence[np.ndarray]) -> Autoencoder:
    """An autoencoder of ``recipe`` trained (L1 reconstruction, Adam) on fresh random crops of ``photos``."""
    with reproducible(recipe.seed):
        model = Autoencoder(recipe)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        for step in range(recipe.steps):
            rng = sample_rng(recipe.seed, TRAIN_CROP_STREAM, step)
            batch = _as_tensor([random_crop(photos, rng, recipe.size) for _ in range(recipe.batch_size)])
            output = model(batch)
            loss = (output - batch).abs().mean()
            if recipe.spectrum_weight:
                loss = (
                    loss
                    + recipe.spectrum_weight * (_log_spectrum(output) - _log_spectrum(batch)).abs().mean()
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def _log_spectrum(images: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.fft.rfft2(images, norm="ortho").abs())


def reconstruct(model: Autoencoder, images: Sequence[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """The model's reconstructions of uint8 RGB ``images``, as uint8 RGB (the fakes)."""
    out: list[np.ndarray] = []
    with reproducible(0), torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = model(_as_tensor(images[start : start + batch_size]))
            out += [to_uint8(image) for image in batch.permute(0, 2, 3, 1).numpy()]
    return out


def photos_digest(photos: Sequence[np.ndarray]) -> str:
    """A short hash of the source photographs (another scikit-image release may ship other ones)."""
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(str(photo.shape).encode())
        digest.update(np.ascontiguousarray(photo).tobytes())
    return digest.hexdigest()[:12]


def generator_file(folder: str | Path, name: str, recipe: GeneratorRecipe, photos) -> Path:
    """Where the trained generator of ``recipe`` on ``photos`` is cached in ``folder``."""
    return Path(folder) / f"{name}-{recipe.key()}-{photos_digest(photos)}.safetensors"


def ensure_generator(folder: str | Path, name: str, recipe: GeneratorRecipe, photos) -> Autoencoder:
    """The trained generator of ``recipe``: loaded from ``folder`` when cached there, else trained on
    ``photos`` and saved (with its recipe beside it, as JSON)."""
    from safetensors.torch import load_file, save_file

    path = generator_file(folder, name, recipe, photos)
    if path.is_file():
        model = Autoencoder(recipe)
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_generator(recipe, photos)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # a run killed while saving leaves no half-written cache
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    partial.replace(path)
    path.with_suffix(".json").write_text(
        json.dumps({"name": name, **asdict(recipe), "photos": photos_digest(photos)}, indent=1) + "\n"
    )
    return model

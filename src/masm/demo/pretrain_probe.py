"""Evidence that pretraining created structure: a source-photo probe, view retrieval, and the attention
projections' spectral energy (:func:`backbone_structure`, written to ``recipe.json`` for the pretrained
backbone and a random one of the same config and seed).

The probe's views use colour jitter and blur, as SimCLR makes them; batched in torch and driven by one
seeded generator. They are never part of the objective (:mod:`masm.demo.pretrain_objective`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from .pretrain_data import crops_with_sources, skimage_sources, to_luma, to_model_input

# Structure probe only (not the objective): views with colour jitter and blur, as SimCLR makes them.
BASE_CROP = 96  # side of the crop the two views are cut from
VIEW_AREA = (0.35, 1.0)  # random resized crop: fraction of the base crop's area
VIEW_ASPECT = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness, contrast, saturation each x U(1 - JITTER, 1 + JITTER)
JITTER_P, GRAY_P, BLUR_P = 0.8, 0.2, 0.5
BLUR_SIGMA = (0.1, 1.5)


# =========================================================================================================
# Augmentation (batched, in torch, driven by one seeded generator)


def augment_views(images: torch.Tensor, out_size: int, gen: torch.Generator) -> torch.Tensor:
    """One SimCLR view of each image (float NCHW in [0, 1]): resized crop, flip, jitter, gray, blur."""
    x = _random_resized_crop(images, out_size, gen)
    x = _color_jitter(x, gen)
    gray = _rand(len(x), gen) < GRAY_P
    x = torch.where(gray.view(-1, 1, 1, 1), to_luma(x).expand_as(x), x)
    blur = _rand(len(x), gen) < BLUR_P
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * _rand(len(x), gen)
    x = torch.where(blur.view(-1, 1, 1, 1), _gaussian_blur(x, sigma), x)
    return x.clamp(0, 1)


def _rand(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def _random_resized_crop(images: torch.Tensor, out_size: int, gen: torch.Generator) -> torch.Tensor:
    n = len(images)
    area = VIEW_AREA[0] + (VIEW_AREA[1] - VIEW_AREA[0]) * _rand(n, gen)
    log_aspect = math.log(VIEW_ASPECT[0]) + (math.log(VIEW_ASPECT[1]) - math.log(VIEW_ASPECT[0])) * _rand(
        n, gen
    )
    aspect = log_aspect.exp()
    # half-widths in normalised coordinates ([-1, 1] spans the image); the box stays inside the image
    half_w = (area * aspect).sqrt().clamp(max=1.0)
    half_h = (area / aspect).sqrt().clamp(max=1.0)
    center_x = (1 - half_w) * (2 * _rand(n, gen) - 1)
    center_y = (1 - half_h) * (2 * _rand(n, gen) - 1)
    flip = torch.where(_rand(n, gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    # downscaling by up to 1.5x: smooth first so bilinear sampling does not alias
    return F.grid_sample(F.avg_pool2d(images, 3, 1, 1), grid, mode="bilinear", align_corners=False)


def _color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)

    def factor() -> torch.Tensor:
        return (1 - JITTER + 2 * JITTER * _rand(n, gen)).view(-1, 1, 1, 1)

    brightness, contrast, saturation = factor(), factor(), factor()
    jittered = (x * brightness).clamp(0, 1)
    mean = to_luma(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = (mean + (jittered - mean) * contrast).clamp(0, 1)
    jittered = (to_luma(jittered) + (jittered - to_luma(jittered)) * saturation).clamp(0, 1)
    apply = _rand(n, gen) < JITTER_P
    return torch.where(apply.view(-1, 1, 1, 1), jittered, x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per-image Gaussian blur (separable, reflect padding) with a grouped convolution."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


# =========================================================================================================
# Structure measures


@torch.no_grad()
def pooled_features(
    model: CLIPVisionModel, pixel_values: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """``pooler_output`` of ``model`` for normalised NCHW inputs, in eval mode."""
    model.eval()
    return torch.cat(
        [model(pixel_values=chunk).pooler_output for chunk in pixel_values.split(batch_size)]
    ).float()


def backbone_structure(
    model: CLIPVisionModel,
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_test: int = 500,
    n_retrieval: int = 256,
    top_k: int = 16,
) -> dict[str, float]:
    """How much structure a backbone has, in three numbers (compare against a random backbone):

    * ``source_probe_acc``: accuracy of a logistic-regression probe on the pooled features telling which
      scikit-image photo (of about 17) a colour-jittered crop came from; held-out crops.
    * ``view_retrieval_top1``: for 256 crops, how often the nearest pooled feature (cosine) of one
      augmented view is the other view of the same crop.
    * ``attn_top{k}_energy``: mean over all attention projections of the share of ``||W||_F^2`` in the top
      ``k`` singular values (a peaked spectrum: the principal directions MASM freezes carry more).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sources = skimage_sources()
    size = model.config.image_size
    gen = torch.Generator().manual_seed(10_000 + seed)
    rng = np.random.default_rng([10_000, seed])

    crops, labels = crops_with_sources(n_train + n_test, size, rng, sources)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    features = pooled_features(model, to_model_input(_color_jitter(images, gen))).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    probe.fit(features[:n_train], labels[:n_train])
    source_acc = float(probe.score(features[n_train:], labels[n_train:]))

    crops, _ = crops_with_sources(n_retrieval, BASE_CROP, rng, sources)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    f1 = F.normalize(pooled_features(model, to_model_input(augment_views(images, size, gen))), dim=-1)
    f2 = F.normalize(pooled_features(model, to_model_input(augment_views(images, size, gen))), dim=-1)
    retrieval = float((f1 @ f2.T).argmax(dim=1).eq(torch.arange(n_retrieval)).float().mean())

    return {
        "source_probe_acc": round(source_acc, 4),
        "source_probe_chance": round(float(np.bincount(labels).max() / len(labels)), 4),
        "view_retrieval_top1": round(retrieval, 4),
        f"attn_top{top_k}_energy": round(attention_energy_share(model, top_k), 4),
    }


@torch.no_grad()
def attention_energy_share(model: nn.Module, top_k: int) -> float:
    """Mean share of the squared Frobenius norm in the top ``top_k`` singular values of q/k/v/out."""
    shares = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in {
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
        }:
            energy = torch.linalg.svdvals(module.weight.double()) ** 2
            shares.append(float(energy[:top_k].sum() / energy.sum()))
    return float(np.mean(shares))

"""The pretraining objective of the demo backbone: masked image modelling that keeps fine detail.

SimMIM on 8 x 8 px patches (hidden patches predicted from context), the visible patches reconstructed too
(the encoder must keep what context cannot predict), and the pooled feature trained to summarise each
visible patch's fine-detail energy and mean colour. Why these three terms: :mod:`masm.demo.pretrain`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..models.preprocessing import CLIP_MEAN, CLIP_STD
from .pretrain_data import to_luma, to_model_input

# --- objective constants (all written to recipe.json by masm.demo.pretrain) -------------------------------
MASK_RATIO = 0.6  # share of the 8 x 8 px patches hidden in each crop (SimMIM)
NORM_PIX_EPS = 1e-4  # variance floor of the per-patch target normalisation (pixels in [0, 1])
VISIBLE_WEIGHT = 1.0  # weight of the visible patches' reconstruction next to the hidden ones' prediction
SUMMARY_WEIGHT = 1.0  # weight of the pooled feature's summary of the visible patches (detail map + thumbnail)
DETAIL_EPS = 1e-5  # floor of a patch's mean squared Laplacian before the log
DETAIL_MEAN, DETAIL_STD = -4.68, 2.40  # of that log over real crops (measured on 512 crops, seed 0)


class PixelDecoder(nn.Module):
    """SimMIM's decoder: one linear map from each patch token (post-LayerNorm) to that patch's pixels, and
    one from the pooled feature to the summary of the visible patches (:func:`patch_summary`).

    Both are deliberately weak (linear), so the encoder itself must carry each patch's texture and the
    pooled feature a map of it; discarded after pretraining.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.patch = config.patch_size
        self.proj = nn.Linear(config.hidden_size, 3 * config.patch_size**2)
        patches = (config.image_size // config.patch_size) ** 2
        # pooled feature -> per patch: log detail energy (1) and mean colour (3)
        self.summary = nn.Linear(config.hidden_size, 4 * patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def _vision_tower(model: CLIPVisionModel) -> nn.Module:
    """The module holding ``post_layernorm`` (transformers 4 nests it under ``vision_model``, 5 does not)."""
    return getattr(model, "vision_model", model)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """NCHW -> (N, patches, 3·patch²), patches in row-major order (the ViT's token order)."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def random_patch_mask(n: int, patches: int, gen: torch.Generator) -> torch.Tensor:
    """(N, patches) bool: exactly ``round(MASK_RATIO · patches)`` masked patches per image."""
    count = round(MASK_RATIO * patches)
    order = torch.rand(n, patches, generator=gen).argsort(dim=1)
    return order < count


def masked_reconstruction_loss(
    model: CLIPVisionModel, decoder: PixelDecoder, images: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Masked image modelling on float NCHW images in [0, 1], with the visible patches reconstructed too.

    Hidden patches are set to the normalised input's zero (CLIP's mean colour) and predicted from the
    rest, as in SimMIM: that teaches context. Visible patches must be reconstructed as well, from the last
    layer: SimMIM alone lets the encoder drop what context cannot predict (measured: its features lose
    sensitivity to sensor noise, below a random network's), and that unpredictable fine detail is the
    evidence a forgery detector needs. Every target is the patch's own pixels normalised by its mean and
    standard deviation (MAE's normalised-pixel target), so the loss is about texture (edges, grain,
    noise, compression) rather than colour.
    """
    patch = model.config.patch_size
    grid = images.shape[-1] // patch
    mask = random_patch_mask(len(images), grid * grid, gen)
    pixel_mask = mask.view(-1, 1, grid, 1, grid, 1).expand(-1, 1, grid, patch, grid, patch)
    pixel_mask = pixel_mask.reshape(len(images), 1, grid * patch, grid * patch)
    inputs = to_model_input(images).masked_fill(pixel_mask, 0.0)
    output = model(pixel_values=inputs)
    prediction = decoder(_vision_tower(model).post_layernorm(output.last_hidden_state[:, 1:]))
    target = patchify(images, patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    per_patch = (prediction - target).pow(2).mean(-1)
    hidden_loss = (per_patch * mask).sum() / mask.sum()
    visible_loss = (per_patch * ~mask).sum() / (~mask).sum()
    summary = decoder.summary(output.pooler_output).view(len(images), -1, 4)
    per_patch = (summary - patch_summary(images, patch)).pow(2).mean(-1)
    summary_loss = (per_patch * ~mask).sum() / (~mask).sum()
    return hidden_loss + VISIBLE_WEIGHT * visible_loss + SUMMARY_WEIGHT * summary_loss


def patch_summary(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, patches, 4): each patch's log mean squared Laplacian of the luma (its fine detail: grain, edges,
    noise, blur) and its mean colour, both standardised; patches in token order.

    The pooled feature is trained to predict this map for the visible patches, so that it summarises
    where the fine detail and the colours of an image are, instead of being left untrained by pixel
    reconstruction (which only reads patch tokens).
    """
    luma = to_luma(images)
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    detail = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), laplacian).pow(2)
    detail = (F.avg_pool2d(detail, patch).add(DETAIL_EPS).log() - DETAIL_MEAN) / DETAIL_STD
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    colour = (F.avg_pool2d(images, patch) - mean) / std
    return torch.cat([detail, colour], 1).flatten(2).transpose(1, 2)

"""What every explanation method returns, and the steps they share.

Below :mod:`.maps` (which picks a method) and the methods themselves (:mod:`.relevance`, :mod:`.gradcam`),
so that a method never imports the module that dispatches to it. Both explain the logit of P(fake)
(:func:`fake_log_odds`: ``l_fake - l_real`` of a two-logit head, the logit of a one-logit head), and carry their patch-grid map to the model input the same way
(:func:`grid_to_input`): bilinear upsampling, then min-max scaling per image to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.calibration import log_odds_of_logits
from ..models.detector import fake_probability


@dataclass
class Explanation:
    """One batch explained: P(fake) per image and its map, ``(N, S, S)`` in [0, 1] at the model input;
    ``log_odds`` (``l_fake - l_real``) is what a calibrated score is made from without float32 saturation."""

    scores: torch.Tensor
    maps: torch.Tensor
    log_odds: torch.Tensor | None = None


def scale_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1]; a constant map becomes all 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def grid_to_input(patch_maps: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, g, g)`` patch-grid maps -> ``(N, size, size)`` in [0, 1]."""
    up = F.interpolate(patch_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return scale_unit(up[:, 0])


def fake_log_odds(logits: torch.Tensor) -> torch.Tensor:
    return log_odds_of_logits(logits)


def fake_scores(logits: torch.Tensor) -> torch.Tensor:
    """P(fake) of a batch's logits (detached): what :class:`Explanation` reports as ``scores``."""
    return fake_probability(logits.detach())

"""Do the maps point at the forgery? Scores against a known region, and the maps to compare with.

* pixel AUC: the ROC AUC of one image's map values against its region mask (pixels inside vs outside),
  averaged over images; 0.5 is a map that ranks the region's pixels no higher than the rest;
* pointing game: whether the map's maximum lies inside the region. Where several pixels share the maximum
  (a constant map), the hit counts as the share of them inside: what breaking the tie at random would
  score on average, so a uniform map scores the region's area fraction and not an arbitrary 0 or 1.

Baselines, every one ``(N, S, S)`` in [0, 1] at the model input like the Grad-CAM maps:

* uniform: the same value everywhere (no information);
* random: uniform noise on the patch grid, upsampled as Grad-CAM's are (same smoothness, no information);
* input gradient: ``|d logit(P(fake)) / d pixel|``, the largest over colour channels (Simonyan et al.,
  2014), one forward and one backward as Grad-CAM.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .explanation import fake_log_odds, scale_unit


def pixel_auc(map_: np.ndarray, mask: np.ndarray) -> float | None:
    """ROC AUC of ``map_``'s values for the pixels of boolean ``mask``; None when the mask is all one class."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(mask, dtype=bool).ravel()
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(map_, dtype=np.float64).ravel()))


def pointing_hit(map_: np.ndarray, mask: np.ndarray) -> float:
    """1 when ``map_``'s maximum lies inside ``mask`` (ties: the share of maximal pixels inside)."""
    values = np.asarray(map_)
    top = values >= values.max()
    return float(np.asarray(mask, dtype=bool)[top].mean())


def uniform_maps(count: int, size: int) -> torch.Tensor:
    return torch.full((count, size, size), 0.5)


def random_maps(count: int, grid: int, size: int, seed: int) -> torch.Tensor:
    noise = torch.rand(count, 1, grid, grid, generator=torch.Generator().manual_seed(seed))
    return scale_unit(F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0])


def input_gradient_maps(detector, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Plain saliency: the largest absolute input gradient of the log-odds of fake over channels."""
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    parts = []
    try:
        for chunk in pixel_values.split(batch_size):
            x = chunk.to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = detector(x).float()
                (grad,) = torch.autograd.grad(fake_log_odds(logits).sum(), x)
            parts.append(scale_unit(grad.abs().amax(dim=1)).cpu())
    finally:
        detector.train(was_training)
    return torch.cat(parts)


def localization_scores(maps: torch.Tensor | np.ndarray, masks: np.ndarray) -> dict[str, float | int]:
    """Mean pixel AUC and pointing game of ``maps`` against boolean ``masks`` (both ``(N, S, S)``)."""
    maps = np.asarray(maps)
    aucs = [a for a in (pixel_auc(m, k) for m, k in zip(maps, masks)) if a is not None]
    hits = [pointing_hit(m, k) for m, k in zip(maps, masks)]
    return {
        "pixel_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "pointing_game": float(np.mean(hits)) if hits else float("nan"),
        "images": len(hits),
    }

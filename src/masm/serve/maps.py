"""Explanation maps for the service: :func:`masm.explain` on the crops the model scored, as PNG overlays.

The maps are computed on the model inputs (the aligned face or the resized image), so each one is shown
over the crop it explains; a data URL keeps the answer one self-contained JSON object.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch


def explain_crops(detector, crops: torch.Tensor) -> list[np.ndarray]:
    """One map in [0, 1] per preprocessed crop ``(N, 3, S, S)``, at ``S`` x ``S``."""
    from masm.explain import explain

    return explain(detector, crops)


def overlay_png(crop: torch.Tensor, heat: np.ndarray, mean, std) -> str:
    """A ``data:image/png`` URL of ``crop`` (normalised as the model saw it) with ``heat`` laid over it."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = crop.permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)
    colour = colormaps["inferno"](heat)[..., :3]
    # The map's weight follows its value, so regions without evidence show the crop itself.
    alpha = 0.6 * heat[..., None]
    blend = np.clip((1 - alpha) * rgb + alpha * colour, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((blend * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

"""Explanation maps of a detector's P(fake): the methods, batching, and the public :func:`explain`.

Default method: gradient-weighted attention relevance (Chefer et al.), :mod:`.relevance`. Grad-CAM over
the patch tokens (:mod:`.gradcam`) is kept as ``method="grad-cam"``: on the demo detector it points
*away* from the forged region (``masm bench explain``), because a ViT's token activations are signed and
Grad-CAM's channel-weighted sum of them has no reliable sign. Both explain ``l_fake - l_real``, the logit
of P(fake): the part of the two logits that moves the score (the common part of a 2-way softmax does not).

Every map is ``(S, S)`` at the model input, bilinearly upsampled from the patch grid and min-max scaled per
image to [0, 1] (a map without any positive evidence is all 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import MasmError
from .explanation import Explanation

DEFAULT_METHOD = "relevance"


def make_explainer(detector, method: str = DEFAULT_METHOD):
    """The explainer ``method`` for ``detector``: ``explainer(pixel_values) -> Explanation``."""
    from .gradcam import TokenGradCAM
    from .relevance import AttentionRelevance

    methods = {"relevance": AttentionRelevance, "grad-cam": TokenGradCAM}
    if method not in methods:
        raise MasmError(f"unknown explanation method {method!r}; known: {', '.join(methods)}")
    return methods[method](detector)


def explain_batches(
    detector, pixel_values: torch.Tensor, *, batch_size: int = 32, method: str = DEFAULT_METHOD
) -> Explanation:
    """Explain ``pixel_values`` (N, 3, S, S) in batches on the detector's device; results on the CPU."""
    device = next(detector.parameters()).device
    explainer = make_explainer(detector, method)
    parts = [explainer(chunk.to(device)) for chunk in pixel_values.split(batch_size)]
    return Explanation(
        scores=torch.cat([p.scores for p in parts]).cpu(),
        maps=torch.cat([p.maps for p in parts]).cpu(),
        log_odds=torch.cat([p.log_odds for p in parts]).cpu(),
    )


def explain(
    detector,
    images: torch.Tensor | Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    method: str = DEFAULT_METHOD,
) -> list[np.ndarray]:
    """Explanation maps of ``detector``'s P(fake), one float32 ``(H, W)`` array in [0, 1] per image.

    ``images`` are either RGB ``uint8`` arrays ``(H, W, 3)`` of any size (preprocessed as the detector
    expects; each map is returned at its image's size, zero where the model saw nothing), or
    an already preprocessed batch ``(N, 3, S, S)`` (maps at ``S`` x ``S``). Merged or not, the detector is
    not changed, and its parameters get no ``.grad``. One forward and one backward per ``batch_size``.
    """
    from ..data.transforms import build_transform
    from .geometry import to_frame, transform_matrices

    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise MasmError(f"explain: expected a (N, 3, S, S) batch, got shape {tuple(images.shape)}")
        result = explain_batches(detector, images, batch_size=batch_size, method=method)
        return list(result.maps.numpy().astype(np.float32))
    images = list(images)
    if not images:
        return []
    transform = build_transform(detector.preprocessing, train=False)
    # A whole-image detector may cut an image into several tiles: each map lands where its tile was cut,
    # and an image's map is the largest value of any of its tiles' at each pixel.
    crops, owners = [], []
    for number, image in enumerate(images):
        pixels = transform(np.asarray(image))
        image_crops = list(pixels) if transform.tiled else [pixels]
        crops += image_crops
        owners += [number] * len(image_crops)
    maps = explain_batches(detector, torch.stack(crops), batch_size=batch_size, method=method).maps.numpy()
    matrices = [m for image in images for m in transform_matrices(transform, *image.shape[:2])]
    framed: list[list[np.ndarray]] = [[] for _ in images]
    for map_, matrix, number in zip(maps, matrices, owners):
        framed[number].append(to_frame(map_, matrix, images[number].shape[:2]))
    return [np.maximum.reduce(maps_of_image) for maps_of_image in framed]

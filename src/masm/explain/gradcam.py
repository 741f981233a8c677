"""Grad-CAM over a ViT's patch tokens, for the detector's log-odds of "fake".

Why not pytorch-grad-cam (PyPI ``grad-cam``, 1.5.7): it requires torchvision (and imports it when loaded),
whose PyPI wheels match only CUDA torch builds, the reason timm is not in masm's ``all`` extra either; and
what masm needs of it is one hook and one backward. This module is that, for every backbone family.

How. A forward pre-hook on encoder block ``layer`` (default: the last) replaces the token sequence
entering it by a detached copy that requires grad. The forward pass then builds a graph from that point on
only, and one ``torch.autograd.grad`` of the batch's summed target gives every image's token gradients
(images in a batch do not interact: LayerNorm is per token). The target is ``l_fake - l_real``, the logit
of P(fake): the part of the two logits that moves the score (the common part of a 2-way softmax does not).
Tokens entering the last block, not leaving it: where the head reads only the class token (CLIP, DINO),
the patch tokens after the last block get no gradient at all.

Grad-CAM (Selvaraju et al., 2017) on tokens: channel weights are the token-mean of the gradients, the map
is the ReLU of the weighted channel sum per patch token, reshaped to the patch grid, upsampled bilinearly
to the input and min-max scaled per image to [0, 1] (a map without any positive evidence is all 0).

Parameters get no ``.grad``: only the captured tokens are differentiated, so explaining a detector during
or between training steps leaves its gradients alone. Merged and unmerged detectors compute the same
function, so they get the same map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MasmError


@dataclass
class Explanation:
    """One batch explained: P(fake) per image and its map, ``(N, S, S)`` in [0, 1] at the model input."""

    scores: torch.Tensor
    maps: torch.Tensor


class TokenGradCAM:
    """Grad-CAM over the patch tokens entering encoder block ``layer`` of ``detector``.

    ``explainer(pixel_values)`` runs one forward and one backward and returns an :class:`Explanation`.
    The detector is used as it is (merged or not, on its device); it is put in eval mode for the call and
    left in the mode it was in.
    """

    def __init__(self, detector, layer: int = -1):
        self.detector = detector
        blocks = detector.family.blocks(detector.backbone)
        if not -len(blocks) <= layer < len(blocks):
            raise MasmError(
                f"explanation layer {layer} does not exist: the backbone has {len(blocks)} blocks"
            )
        self.block = blocks[layer]
        self.grid = detector.preprocessing.input_size // detector.family.patch_size(detector.backbone)

    def __call__(self, pixel_values: torch.Tensor) -> Explanation:
        captured: list[torch.Tensor] = []

        def capture(_module, args, kwargs):
            # The tokens come first, positionally or by name (transformers versions differ).
            if args:
                tokens = args[0].detach().requires_grad_(True)
                captured.append(tokens)
                return (tokens, *args[1:]), kwargs
            tokens = kwargs["hidden_states"].detach().requires_grad_(True)
            captured.append(tokens)
            return args, {**kwargs, "hidden_states": tokens}

        was_training = self.detector.training
        self.detector.eval()
        handle = self.block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.enable_grad():
                logits = self.detector(pixel_values).float()
                tokens = captured[0]
                target = logits[:, 1] - logits[:, 0]
                (grads,) = torch.autograd.grad(target.sum(), tokens)
        finally:
            handle.remove()
            self.detector.train(was_training)
        cam = self.token_map(tokens.detach().float(), grads.float())
        size = pixel_values.shape[-1]
        maps = F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Explanation(scores=logits.detach().softmax(-1)[:, 1], maps=scale_unit(maps))

    def token_map(self, tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of the patch tokens (the last grid² of the sequence), ``(N, grid, grid)``, not scaled."""
        n, count = tokens.shape[0], self.grid * self.grid
        if tokens.shape[1] < count:
            raise MasmError(
                f"explanation: {tokens.shape[1]} tokens enter the block, fewer than the {count} patches "
                f"of a {self.grid}x{self.grid} grid"
            )
        tokens, grads = tokens[:, -count:], grads[:, -count:]
        weights = grads.mean(dim=1, keepdim=True)  # (N, 1, D): one weight per channel
        return (tokens * weights).sum(-1).clamp_min(0).reshape(n, self.grid, self.grid)


def scale_unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1]; a constant map becomes all 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def explain_batches(
    detector, pixel_values: torch.Tensor, *, batch_size: int = 32, layer: int = -1
) -> Explanation:
    """:class:`TokenGradCAM` over ``pixel_values`` (N, 3, S, S) in batches, on the detector's device."""
    device = next(detector.parameters()).device
    explainer = TokenGradCAM(detector, layer)
    parts = [explainer(chunk.to(device)) for chunk in pixel_values.split(batch_size)]
    return Explanation(
        scores=torch.cat([p.scores for p in parts]).cpu(), maps=torch.cat([p.maps for p in parts]).cpu()
    )


def explain(
    detector,
    images: torch.Tensor | Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    layer: int = -1,
) -> list[np.ndarray]:
    """Explanation maps of ``detector``'s P(fake), one float32 ``(H, W)`` array in [0, 1] per image.

    ``images`` are either RGB ``uint8`` arrays ``(H, W, 3)`` of any size (preprocessed as the detector
    expects; each map is returned at its image's size, zero outside the centre square the model saw), or
    an already preprocessed batch ``(N, 3, S, S)`` (maps at ``S`` x ``S``). Merged or not, the detector is
    not changed. One forward and one backward per batch of ``batch_size``.
    """
    from ..data.transforms import build_transform
    from .geometry import input_matrix, to_frame

    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise MasmError(f"explain: expected a (N, 3, S, S) batch, got shape {tuple(images.shape)}")
        result = explain_batches(detector, images, batch_size=batch_size, layer=layer)
        return list(result.maps.numpy().astype(np.float32))
    images = list(images)
    if not images:
        return []
    transform = build_transform(detector.preprocessing, train=False)
    pixels = torch.stack([transform(np.asarray(image)) for image in images])
    maps = explain_batches(detector, pixels, batch_size=batch_size, layer=layer).maps.numpy()
    size = detector.preprocessing.input_size
    return [
        to_frame(m, input_matrix(image.shape[0], image.shape[1], size), image.shape[:2])
        for m, image in zip(maps, images)
    ]

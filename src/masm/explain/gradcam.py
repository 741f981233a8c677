"""Grad-CAM over a ViT's patch tokens (``method="grad-cam"``; not the default, see :mod:`.maps`).

A forward pre-hook on encoder block ``layer`` (default: the last) replaces the token sequence entering it
by a detached copy that requires grad, so the graph starts there and one ``torch.autograd.grad`` gives
every image's token gradients (images in a batch do not interact: LayerNorm is per token). Tokens
entering the last block, not leaving it: where the head reads only the class token (CLIP, DINO), patch
tokens after the last block get no gradient at all. Grad-CAM (Selvaraju et al., 2017) on tokens: channel
weights are the token-mean of the gradients, the map is the ReLU of the weighted channel sum per patch.
"""

from __future__ import annotations

import torch

from ..errors import MasmError
from .explanation import Explanation, fake_log_odds, fake_scores, grid_to_input


class TokenGradCAM:
    """``explainer(pixel_values) -> Explanation``: one forward, one backward (from block ``layer`` on)."""

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
            # Gradients even under torch.no_grad() or torch.inference_mode() (see relevance.py).
            with torch.inference_mode(False), torch.enable_grad():
                logits = self.detector(pixel_values.clone())
                (grads,) = torch.autograd.grad(fake_log_odds(logits).sum(), captured[0])
        finally:
            handle.remove()
            self.detector.train(was_training)
        cam = self.token_map(captured[0].detach().float(), grads.float())
        maps = grid_to_input(cam, pixel_values.shape[-1])
        return Explanation(
            scores=fake_scores(logits),
            maps=maps,
            log_odds=fake_log_odds(logits.detach()),
        )

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

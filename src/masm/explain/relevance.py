"""Gradient-weighted attention relevance (Chefer, Gur and Wolf), the default explanation.

The rule of their ICCV 2021 paper (arXiv 2103.15679), which keeps the gradient weighting of their CVPR 2021
method (arXiv 2012.09838) and uses the attention itself where that one needs LRP relevances of every
layer: the same single backward, and no per-layer relevance rules for each family's modules.

Every block's attention probabilities ``A`` (heads x T x T) are captured in the forward pass
(:meth:`masm.models.families.BackboneFamily.attention_probabilities`), and one backward of the batch's
summed log-odds of fake gives their gradients ``∇A``. Relevance starts as the identity (each token is
itself) and goes through the blocks in order::

    Ā = mean over heads of ReLU(∇A ⊙ A)        # attention that raised the fake score
    R = R + Ā R                                 # the residual keeps what was there

The patch tokens' relevance to the token(s) the head reads (the class token, or all tokens where an
attention-pooling head reads every one, as SigLIP's) is the map. Gradient-weighted relevance beats
rollout, Grad-CAM and LRP on ViT perturbation and segmentation tests (arXiv 2012.09838), and on the demo
detector it is the one map here that finds the forged region (``masm bench explain``).

Why not pytorch-grad-cam (PyPI ``grad-cam`` 1.5.7): it requires torchvision and imports it when loaded,
whose PyPI wheels match only CUDA torch builds (the reason timm is not in masm's ``all`` extra either),
and it has no attention-relevance method; what masm needs is a few hooks and one backward.

The input is made to require grad so that the attention of a detector whose weights are all frozen
(a merged checkpoint) still has a gradient; parameters get no ``.grad`` (only the captured attention is
differentiated). Images in a batch do not interact, so one backward of the summed target serves all.
"""

from __future__ import annotations

import torch

from .explanation import Explanation, fake_log_odds, fake_scores, grid_to_input


class AttentionRelevance:
    """``explainer(pixel_values) -> Explanation``: one forward and one backward per call."""

    def __init__(self, detector):
        self.detector = detector
        family, backbone = detector.family, detector.backbone
        self.grid = detector.preprocessing.input_size // family.patch_size(backbone)
        self.readout = family.readout_of(backbone)

    def __call__(self, pixel_values: torch.Tensor) -> Explanation:
        detector = self.detector
        was_training = detector.training
        detector.eval()
        try:
            # Gradients even when called under torch.no_grad() or torch.inference_mode() (a service may
            # be); the clone is an ordinary tensor even if pixel_values was made in inference mode.
            with torch.inference_mode(False), torch.enable_grad():
                pixels = pixel_values.clone().requires_grad_(True)
                with detector.family.attention_probabilities(detector.backbone) as found:
                    logits = detector(pixels)
                    grads = torch.autograd.grad(fake_log_odds(logits).sum(), found)
                    attentions = [a.detach() for a in found]
        finally:
            detector.train(was_training)
        patch_maps = self.relevance(attentions, grads)
        maps = grid_to_input(patch_maps, pixel_values.shape[-1])
        return Explanation(
            scores=fake_scores(logits),
            maps=maps,
            log_odds=fake_log_odds(logits.detach()),
        )

    def relevance(self, attentions, grads) -> torch.Tensor:
        """Patch relevance ``(N, grid, grid)`` from every block's attention and its gradient."""
        n, _, tokens, _ = attentions[0].shape
        relevance = torch.eye(tokens, device=attentions[0].device).expand(n, tokens, tokens)
        for attention, grad in zip(attentions, grads):
            weighted = (grad.float() * attention.float()).clamp_min(0).mean(dim=1)
            relevance = relevance + weighted @ relevance
        count = self.grid * self.grid
        rows = relevance[:, :1] if self.readout == "class" else relevance
        return rows[:, :, -count:].mean(dim=1).reshape(n, self.grid, self.grid)

"""Total MASM objective: ``L = L_cls + λ_orth·L_orth + λ_spec·L_spec`` (method.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .apply import masm_layers
from .config import MASMConfig


def regularizers(model: nn.Module, config: MASMConfig) -> dict[str, torch.Tensor]:
    """Layer-averaged ``orth`` and ``spec`` terms (unweighted). Terms whose weight is 0 are not computed."""
    layers = [layer for _, layer in masm_layers(model)]
    terms: dict[str, torch.Tensor] = {}
    if not layers:
        return terms
    if config.lambda_orth:
        terms["orth"] = torch.stack([layer.orthogonality_loss() for layer in layers]).mean()
    if config.lambda_spec:
        terms["spec"] = torch.stack([layer.spectral_loss(config.spectral_mode) for layer in layers]).mean()
    return terms


def total_loss(
    logits: torch.Tensor, labels: torch.Tensor, model: nn.Module, config: MASMConfig | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective and each of its terms (detached, so logging does not force a device sync)."""
    loss = F.cross_entropy(logits.float(), labels)
    logged = {"cls": loss.detach()}
    if config is not None:
        for name, value in regularizers(model, config).items():
            weight = config.lambda_orth if name == "orth" else config.lambda_spec
            loss = loss + weight * value
            logged[name] = value.detach()
    logged["total"] = loss.detach()
    return loss, logged

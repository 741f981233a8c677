"""Total MASM objective: ``L = L_cls + λ_orth·L_orth + λ_spec·L_spec`` (method.md §3)."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .apply import masm_layers
from .config import MASMConfig


def layer_groups(model: nn.Module) -> list[list]:
    """The model's MASM layers grouped by shape (what the batched regularisers stack).

    Computed once by a trainer and passed to :func:`total_loss`, so a step does not walk the module tree.
    """
    groups: dict[tuple, list] = defaultdict(list)
    for _, layer in masm_layers(model):
        key = (layer.out_features, layer.in_features, layer.num_subspaces, layer.subspace_rank)
        groups[key].append(layer)
    return list(groups.values())


def regularizers(
    model: nn.Module, config: MASMConfig, groups: list[list] | None = None
) -> dict[str, torch.Tensor]:
    """Layer-averaged ``orth`` and ``spec`` terms (unweighted). Terms whose weight is 0 are not computed.

    Layers of equal shape are stacked and handled by batched matmuls / Cholesky / SVD, so ViT-L/14's 96
    layers cost a few kernel launches instead of hundreds; the result equals the mean of each layer's own
    :meth:`~masm.method.MASMLinear.orthogonality_loss` / ``spectral_loss``. ``groups``: from
    :func:`layer_groups` (default: computed here).
    """
    groups = layer_groups(model) if groups is None else groups
    layers = [layer for group in groups for layer in group]
    terms: dict[str, torch.Tensor] = {}
    if not layers:
        return terms
    # The factors of every layer once (projected where the guard projects), shared by both terms.
    factors = [[layer.artifact_factors() for layer in group] for group in groups]
    if config.lambda_orth:
        terms["orth"] = torch.cat([_orthogonality(g, f) for g, f in zip(groups, factors)]).mean()
    if config.lambda_spec:
        if config.spectral_mode == "artifact":
            terms["spec"] = torch.cat([_artifact_spectrum(g, f) for g, f in zip(groups, factors)]).mean()
        else:
            terms["spec"] = torch.stack(
                [layer.spectral_loss(config.spectral_mode) for layer in layers]
            ).mean()
    return terms


def _orthogonality(layers: list, factors: list) -> torch.Tensor:
    """Per-layer orthogonality loss of same-shape layers, batched."""
    U = torch.stack([u for u, _, _ in factors])  # L × d_out × Km
    V = torch.stack([v for _, _, v in factors])
    eye = torch.eye(U.shape[-1], device=U.device, dtype=U.dtype)
    loss = (U.mT @ U - eye).pow(2).sum((1, 2)) + (V.mT @ V - eye).pow(2).sum((1, 2))
    if layers[0].semantic_guard == "penalty":  # semantic bases differ per layer: no stacking of big buffers
        loss = loss + torch.stack([lyr.semantic_overlap(u, v) for lyr, u, v in zip(layers, U, V)])
    return loss / U.shape[-1]


def _artifact_spectrum(layers: list, factors: list) -> torch.Tensor:
    """Per-layer artifact spectral loss of same-shape layers, batched over layers and subspaces."""
    K, m = layers[0].num_subspaces, layers[0].subspace_rank
    U = torch.stack([u for u, _, _ in factors]).unflatten(-1, (K, m)).movedim(-2, 1).flatten(0, 1)
    V = torch.stack([v for _, _, v in factors]).unflatten(-1, (K, m)).movedim(-2, 1).flatten(0, 1)
    s = torch.stack([x for _, x, _ in factors]).view(-1, m)  # (L·K) × m; U, V: (L·K) × d × m
    # σ(U diag(s) Vᵀ) = σ(R_u diag(s) R_vᵀ) with R from UᵀU = RᵀR: a batched m×m Cholesky per factor
    # instead of a QR of the tall d×m factor (one fused call on GPU rather than one per matrix).
    r_u = torch.linalg.cholesky_ex(U.mT @ U).L.mT
    r_v = torch.linalg.cholesky_ex(V.mT @ V).L.mT
    sigma = torch.linalg.svdvals((r_u * s[:, None, :]) @ r_v.mT)
    sigma0 = torch.stack([layer.sigma0 for layer in layers])  # L × K × m
    sigma = sigma.view_as(sigma0)
    energy0 = torch.stack([layer.energy0 for layer in layers])
    return (sigma - sigma0).pow(2).sum((1, 2)) / energy0


def total_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    model: nn.Module,
    config: MASMConfig | None,
    groups: list[list] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective and each of its terms (detached, so logging does not force a device sync)."""
    loss = F.cross_entropy(logits.float(), labels)
    logged = {"cls": loss.detach()}
    if config is not None:
        for name, value in regularizers(model, config, groups).items():
            weight = config.lambda_orth if name == "orth" else config.lambda_spec
            loss = loss + weight * value
            logged[name] = value.detach()
    # feature losses of the method (ln-tune's GenD alignment and uniformity terms)
    auxiliary = getattr(model, "auxiliary_losses", None)
    if auxiliary is not None:
        for name, (weight, value) in auxiliary(labels).items():
            loss = loss + weight * value
            logged[name] = value.detach()
    logged["total"] = loss.detach()
    return loss, logged

"""Total MASM objective: ``L = L_cls + λ_orth·L_orth + λ_spec·L_spec`` (method.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MASMConfig
from .groups import layer_groups


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
    spectral_batched = config.lambda_spec and config.spectral_mode == "artifact"
    # Per shape group, the Km×Km Gram matrices of U and V once: L_orth reads them whole, the artifact
    # spectrum their m×m diagonal blocks (one per subspace).
    grams = [_grams(group) for group in groups] if config.lambda_orth or spectral_batched else []
    if config.lambda_orth:
        terms["orth"] = torch.cat([_orthogonality(g, gu, gv) for g, (gu, gv) in zip(groups, grams)]).mean()
    if config.lambda_spec:
        if spectral_batched:
            terms["spec"] = torch.cat(
                [_artifact_spectrum(g, gu, gv) for g, (gu, gv) in zip(groups, grams)]
            ).mean()
        else:
            terms["spec"] = torch.stack(
                [layer.spectral_loss(config.spectral_mode) for layer in layers]
            ).mean()
    return terms


def _grams(layers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``UᵀU`` and ``VᵀV`` of same-shape layers, stacked: L × Km × Km each."""
    U = torch.stack([layer.U for layer in layers])
    V = torch.stack([layer.V for layer in layers])
    return U.mT @ U, V.mT @ V


def _orthogonality(layers: list, gram_u: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """Per-layer orthogonality loss of same-shape layers, from their Gram matrices."""
    eye = torch.eye(gram_u.shape[-1], device=gram_u.device, dtype=gram_u.dtype)
    loss = (gram_u - eye).pow(2).sum((1, 2)) + (gram_v - eye).pow(2).sum((1, 2))
    if layers[0].semantic_guard == "penalty":  # semantic bases differ per layer: no stacking of big buffers
        loss = loss + torch.stack([lyr.semantic_overlap(lyr.U, lyr.V) for lyr in layers])
    return loss / gram_u.shape[-1]


def _artifact_spectrum(layers: list, gram_u: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """Per-layer artifact spectral loss of same-shape layers, batched over layers and subspaces."""
    K, m = layers[0].num_subspaces, layers[0].subspace_rank
    s = torch.stack([layer.s for layer in layers]).view(-1, m)  # (L·K) × m

    def blocks(gram):  # the K diagonal m×m blocks of each layer's Gram: U_kᵀ U_k, as (L·K) × m × m
        return (
            torch.diagonal(gram.unflatten(1, (K, m)).unflatten(3, (K, m)), dim1=1, dim2=3)
            .permute(0, 3, 1, 2)
            .flatten(0, 1)
        )

    # σ(U_k diag(s_k) V_kᵀ) = σ(R_u diag(s_k) R_vᵀ) with U_kᵀU_k = R_uᵀR_u: a batched m×m Cholesky instead of
    # a QR of the tall d×m factor (one fused call on GPU rather than one per matrix).
    r_u = torch.linalg.cholesky_ex(blocks(gram_u)).L.mT
    r_v = torch.linalg.cholesky_ex(blocks(gram_v)).L.mT
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

"""Total MASM objective: ``L = L_cls + λ_orth·L_orth + λ_guard·L_guard + λ_spec·L_spec`` (method.md §3), plus
the feature losses of the method, if any (``L_guard``: only with ``semantic_guard: penalty``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MASMConfig
from .layer import layer_groups


def regularizers(model: nn.Module, config: MASMConfig, groups: list | None = None) -> dict[str, torch.Tensor]:
    """Layer-averaged ``orth``, ``guard`` and ``spec`` terms (unweighted). Terms whose weight is 0 are not
    computed; ``guard`` exists only for layers with ``semantic_guard: penalty``.

    Per layer: ``orth = (‖Q_Uᵀ Q_U − I‖² + ‖Q_Vᵀ Q_V − I‖²) / (K·m)``, ``guard = (‖U_gᵀ Q_U‖² + ‖V_gᵀ Q_V‖²)
    / (K·m)`` (normalised as ``orth``, which held it before it had its own weight), ``spec`` as
    :meth:`~masm.method.MASMLinear.spectral_loss`. Each term is computed on a
    :class:`~masm.method.LayerGroup`'s stacked tensors by batched matmuls / Cholesky / SVD, so ViT-L/14's 96
    layers cost a few operations instead of hundreds. ``groups``: from :func:`layer_groups` (default:
    found here).
    """
    groups = layer_groups(model) if groups is None else groups
    terms: dict[str, torch.Tensor] = {}
    if not groups:
        return terms
    # Per group, the Km×Km Gram matrices of U and V once: L_orth reads them whole, the artifact spectrum
    # their m×m diagonal blocks (one per subspace).
    spectral_batched = config.lambda_spec and config.spectral_mode == "artifact"
    grams = [_grams(g) for g in groups] if config.lambda_orth or spectral_batched else []
    if config.lambda_orth:
        terms["orth"] = _mean([_orthogonality(gu, gv) for gu, gv in grams])
    penalised = [group for group in groups if group.semantic_guard == "penalty"]
    if config.lambda_guard and penalised:
        terms["guard"] = _mean([_guard_penalty(group) for group in penalised])
    if config.lambda_spec:
        if spectral_batched:
            terms["spec"] = _mean([_artifact_spectrum(g, gu, gv) for g, (gu, gv) in zip(groups, grams)])
        elif config.spectral_mode == "energy":
            terms["spec"] = _mean([_energy_drift(group) for group in groups])
        else:
            raise ValueError(f"unknown spectral mode {config.spectral_mode!r}")
    return terms


def _grams(group) -> tuple[torch.Tensor, torch.Tensor]:
    """``UᵀU`` and ``VᵀV`` of every layer of a group: layers × Km × Km each (bmm: no broadcasting views)."""
    return torch.bmm(group.U.mT, group.U), torch.bmm(group.V.mT, group.V)


def _mean(per_layer: list[torch.Tensor]) -> torch.Tensor:
    return per_layer[0].mean() if len(per_layer) == 1 else torch.cat(per_layer).mean()


def _orthogonality(gram_u: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """Per-layer orthogonality loss of a group, from its Gram matrices."""
    eye = torch.eye(gram_u.shape[-1], device=gram_u.device, dtype=gram_u.dtype)
    loss = (gram_u - eye).pow(2).sum((1, 2)) + (gram_v - eye).pow(2).sum((1, 2))
    return loss / gram_u.shape[-1]


def _guard_penalty(group) -> torch.Tensor:
    """Per-layer guard penalty of a group, over K·m."""
    lay = group.layout
    both = overlap(group.U, group.U_basis, lay["u_complement"]) + overlap(
        group.V, group.V_basis, lay["v_complement"]
    )
    return both / group.U.shape[-1]


def overlap(Q: torch.Tensor, basis: torch.Tensor, is_complement: bool) -> torch.Tensor:
    """``‖U_semᵀ Q‖²_F`` from the semantic basis or from its complement; batched over a leading dimension
    of layers (one value per layer) when ``Q`` has one."""
    dims = (-2, -1)
    if is_complement:
        return (Q.pow(2).sum(dims) - (basis.mT @ Q).pow(2).sum(dims)).clamp_min(0)
    return (basis.mT @ Q).pow(2).sum(dims)


def _artifact_spectrum(group, gram_u: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """Per-layer artifact spectral loss of a group, batched over layers and subspaces."""
    K, m = group.num_subspaces, group.subspace_rank
    s = group.s.reshape(-1, m)  # (L·K) × m

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
    sigma = torch.linalg.svdvals((r_u * s[:, None, :]) @ r_v.mT).view_as(group.sigma0)
    return (sigma - group.sigma0).pow(2).sum((1, 2)) / group.energy0


def _energy_drift(group) -> torch.Tensor:
    """Per-layer ``|‖W‖² − ‖W⁰‖²| / ‖W⁰‖²`` of a group (Effort's spectral term), from the factors:
    ``‖W_sem + U diag(s) Vᵀ‖² = ‖W_sem‖² + 2 Σ_j s_j u_jᵀ W_sem v_j + Σ_ij s_i s_j (UᵀU)_ij (VᵀV)_ij``."""
    U, s, V = group.U, group.s, group.V
    cross = (((group.weight_sem.float() @ V) * U).sum(1) * s).sum(1)
    artifact = ((U.mT @ U) * (V.mT @ V) * s[:, :, None] * s[:, None, :]).sum((1, 2))
    energy = group.energy_sem + 2 * cross + artifact
    return (energy - group.energy0).abs() / group.energy0


def total_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    model: nn.Module,
    config: MASMConfig | None,
    groups: list[list] | None = None,
    *,
    auxiliary: dict[str, tuple[float, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective and each of its terms (detached, so logging does not force a device sync).

    ``cls`` is the cross-entropy of a two-logit head (softmax), the binary cross-entropy of a one-logit head
    (its logit is the log-odds of fake). Logged terms: ``cls``, then those of :func:`regularizers` (``orth``, ``guard``, ``spec``) when
    ``config`` is given, then the auxiliary ones, then ``total``. ``auxiliary``: ``{name: (weight,
    value)}`` of further terms; by default those of ``model.auxiliary_losses(labels)`` when the model has
    that method (a :class:`~masm.models.Detector` does: the method's feature losses, e.g. ln-tune's GenD
    alignment and uniformity; empty for methods without any), and none for any other module.
    """
    loss = classification_loss(logits, labels)
    logged = {"cls": loss.detach()}
    if config is not None:
        weights = {"orth": config.lambda_orth, "guard": config.lambda_guard, "spec": config.lambda_spec}
        for name, value in regularizers(model, config, groups).items():
            loss = loss + weights[name] * value
            logged[name] = value.detach()
    if auxiliary is None:
        auxiliary = _model_losses(model, labels)
    for name, (weight, value) in auxiliary.items():
        loss = loss + weight * value
        logged[name] = value.detach()
    logged["total"] = loss.detach()
    return loss, logged


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labels (1 = fake) under a head of two logits (softmax) or one (sigmoid)."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.float()[:, 0], labels.float())
    return F.cross_entropy(logits.float(), labels)


def _model_losses(model: nn.Module, labels: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    # Asked of the model by name, not by its class: the method sits below the models that build on it,
    # and a module without feature losses of its own (a bare layer, a backbone) simply has none.
    own = getattr(model, "auxiliary_losses", None)
    return own(labels) if own is not None else {}

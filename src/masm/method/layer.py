"""The MASM adapter layer: a pretrained ``nn.Linear`` split into a frozen semantic part and K trainable
artifact subspaces (method.md §1–3).

Like PEFT's LoRA and OSF layers, :class:`MASMLinear` takes the place of the original Linear, and
:meth:`MASMLinear.merge` turns it back into a plain ``nn.Linear``. Its tensors live in a
:class:`~masm.method.LayerGroup`, one row per layer, shared by every layer of its shape once
:func:`~masm.method.apply_masm` has grouped them (a layer built on its own is a group of one).

Unlike Effort's reference code, backward computes no full-size weight gradient: the factors' gradients come
from thin low-rank products, and the ``d_out × d_in`` matrices the forward uses are built from the factors
once per forward pass for the whole group, outside autograd. They are never cached across passes, so
nothing can make them stale: not an optimizer step, a ``load_state_dict``, a write through ``.data``, nor a
first build under ``torch.inference_mode``. Those operands and the hand-written backward are in :mod:`masm.method.operands`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MASMConfig
from .decomposition import SVD, residual_groups
from .groups import LAYER_TENSORS, LayerGroup
from .operands import _LowRankLinear, operand_dtype


class MASMLinear(nn.Module):
    """``y = x W_semᵀ + b + ((x V) ⊙ s) Uᵀ``, the K subspaces side by side in one tensor per factor.

    Factors: ``U`` (d_out×Km), ``s`` (Km), ``V`` (d_in×Km); subspace ``k`` is columns ``k·m:(k+1)·m`` of
    each (:meth:`subspace_columns`). Frozen: ``weight_sem`` (the semantic weight), ``bias``, ``sigma0``
    (initial singular values of each subspace, for the spectral loss), ``energy0`` / ``energy_sem``
    (squared Frobenius norms) and, when the semantic guard is on, ``U_basis`` / ``V_basis`` (the guarded
    basis of a side, or its complement where that side is square and the complement smaller).

    Each of these attributes is row :attr:`index` of the tensor of that name in :attr:`group` (a view:
    writing into it writes the layer's row). The Parameters are the group's; the layer's state dict holds
    its rows under the names above, as checkpoints always had them.
    """

    def __init__(self, base: nn.Linear, svd: SVD, config: MASMConfig):
        super().__init__()
        n = min(base.in_features, base.out_features)
        groups = residual_groups(n, config.num_subspaces, config.subspace_rank, config.slicing)
        rank_sem = n - config.artifact_rank
        dtype = base.weight.dtype
        device = base.weight.device
        weight = base.weight.detach().to(svd.U.dtype).cpu()
        U, S, Vh = svd.U, svd.S, svd.Vh

        residual = torch.cat(groups)  # subspace k = positions k·m:(k+1)·m
        # W_sem = W - (residual part), in the SVD's precision: the layer then reproduces W to round-off
        # whatever the truncation, and W itself is not kept.
        weight_sem = weight - (U[:, residual] * S[residual]) @ Vh[residual]
        guard_rank = min(rank_sem, max(1, round(config.guard_rank * n)))
        layout = {
            "out_features": base.out_features,
            "in_features": base.in_features,
            "num_subspaces": config.num_subspaces,
            "subspace_rank": config.subspace_rank,
            "semantic_guard": config.semantic_guard,
            "guard_rank": guard_rank,
            "has_bias": base.bias is not None,
            "u_complement": None,
            "v_complement": None,
        }

        def f32(t):
            return t.to(device, torch.float32).contiguous()

        tensors = {
            "weight_sem": weight_sem.to(device, dtype),
            "bias": None if base.bias is None else base.bias.detach().clone(),
            "U": f32(U[:, residual]),
            "s": f32(S[residual]),
            "V": f32(Vh[residual].T),
            "sigma0": f32(torch.stack([S[g].sort(descending=True).values for g in groups])),
            "energy0": f32(weight.pow(2).sum()),
            "energy_sem": f32(weight_sem.pow(2).sum()),
        }
        if config.semantic_guard != "off":
            # The guard keeps the artifact factors out of the top r_g principal directions only (method.md
            # §3): a guard over all r frozen directions would confine them to the initial residual span.
            # Each side stores the smaller of the guarded basis (d × r_g) and, where the side is square,
            # its complement (d × (n − r_g)); both give the same projection.
            g = guard_rank
            u_complement = base.out_features == n and n - g < g
            v_complement = base.in_features == n and n - g < g
            layout.update(u_complement=u_complement, v_complement=v_complement)
            tensors["U_basis"] = f32(U[:, g:] if u_complement else U[:, :g])
            tensors["V_basis"] = f32(Vh[g:].T if v_complement else Vh[:g].T)
        rows = {name: None if t is None else t.unsqueeze(0) for name, t in tensors.items()}
        self.own_group = LayerGroup(rows, layout)
        self.index = 0

    # -- the group this layer is a row of ---------------------------------------------------------------
    @property
    def group(self) -> LayerGroup:
        own = self._modules.get("own_group")
        return own if own is not None else self.__dict__["_shared_group"]

    def join(self, group: LayerGroup, index: int) -> None:
        """Become row ``index`` of ``group`` (which holds this layer's values already): the layer's own
        tensors are dropped, and the group is not registered here (its owner holds it)."""
        self._modules.pop("own_group", None)
        self.__dict__["_shared_group"] = group
        self.index = index

    def __getattr__(self, name: str):
        if name in _ROW_ATTRIBUTES:
            tensor = getattr(self.group, name)
            return None if tensor is None else tensor[self.index]
        if name in _LAYOUT_ATTRIBUTES:
            return self.group.layout[name]
        return super().__getattr__(name)

    def grad(self, name: str) -> torch.Tensor | None:
        """This layer's row of the gradient of its group's factor ``name`` (``U``, ``s`` or ``V``)."""
        grad = getattr(self.group, name).grad
        return None if grad is None else grad[self.index]

    # -- state dicts: this layer's rows under its own names -------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        group = self.group
        with torch.enable_grad() if keep_vars else torch.no_grad():
            for name in LAYER_TENSORS:
                tensor = getattr(group, name)
                if tensor is not None:
                    row = tensor[self.index]
                    destination[prefix + name] = row if keep_vars else row.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _join_per_subspace_keys(state_dict, prefix, self.num_subspaces)
        group = self.group
        names = [name for name in LAYER_TENSORS if getattr(group, name) is not None]
        for name in names:
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            row = getattr(group, name)[self.index]
            value = state_dict[key]
            if tuple(value.shape) != tuple(row.shape):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                    f"checkpoint, the shape in current model is {tuple(row.shape)}."
                )
                continue
            with torch.no_grad():
                row.copy_(value)
        if strict:
            for key in state_dict:
                if (
                    key.startswith(prefix)
                    and "." not in key[len(prefix) :]
                    and key[len(prefix) :] not in names
                ):
                    unexpected.append(key)

    # -- forward and merge ------------------------------------------------------------------------------
    def subspace_columns(self, k: int) -> slice:
        """The columns of ``U`` and ``V`` (and entries of ``s``) that make up artifact subspace ``k``."""
        return slice(k * self.subspace_rank, (k + 1) * self.subspace_rank)

    def subspace(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(U_k, s_k, V_k)`` of artifact subspace ``k``."""
        cols = self.subspace_columns(k)
        return self.U[:, cols], self.s[cols], self.V[:, cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arguments = self.group.pass_arguments(self.index)
        if arguments is None:  # called outside its model's forward: operands of this layer alone
            arguments = self.group.operands_of(self.index, operand_dtype(self.group, x))
        weight = arguments[0]
        with torch.autocast(x.device.type, enabled=False):
            # The hand-written backward runs in the operands' dtype (autocast's, in mixed precision);
            # autocast would otherwise leave the custom Function and fall back to plain autograd.
            return _LowRankLinear.apply(x.to(weight.dtype), *arguments)

    def merged_weight(self) -> torch.Tensor:
        return self.weight_sem + ((self.U * self.s) @ self.V.T).to(self.weight_sem.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (for inference at the backbone's speed)."""
        weight = self.merged_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # -- a term of the regularisers (method.md §3) for this layer alone; batched over groups in :mod:`.losses`
    def spectral_loss(self, mode: str = "artifact") -> torch.Tensor:
        """Spectral consistency of this layer (the group version is :func:`masm.method.losses.regularizers`).

        ``artifact``: ``Σ_k ‖σ(A_k) − σ⁰_k‖² / ‖W⁰‖²_F`` with ``A_k = U_k diag(s_k) V_kᵀ``. The
        singular values of ``A_k`` come from QR factors of ``U_k`` and ``V_k`` and an m×m SVD, which is
        exact and differentiable. The normaliser is the pretrained weight's energy (method.md §3): the
        artifact part's own tiny initial energy would pin its singular values and forbid learning.
        ``energy``: ``|‖W‖² − ‖W⁰‖²| / ‖W⁰‖²`` (Effort), computed from the factors without forming ``W``.
        """
        U, s, V = self.U, self.s, self.V
        if mode == "artifact":
            m = self.subspace_rank
            sigma = []
            for k in range(self.num_subspaces):
                _, r_u = torch.linalg.qr(U[:, k * m : (k + 1) * m])
                _, r_v = torch.linalg.qr(V[:, k * m : (k + 1) * m])
                sigma.append(torch.linalg.svdvals((r_u * s[k * m : (k + 1) * m]) @ r_v.T))
            sigma = torch.stack(sigma)
            return (sigma - self.sigma0).pow(2).sum() / self.energy0
        if mode == "energy":
            # ‖W_sem + U diag(s) Vᵀ‖² = ‖W_sem‖² + 2 Σ_j s_j u_jᵀ W_sem v_j + Σ_ij s_i s_j (UᵀU)_ij (VᵀV)_ij
            cross = ((self.weight_sem.float() @ V) * U).sum(0) @ s
            artifact = ((U.T @ U) * (V.T @ V) * s[:, None] * s[None, :]).sum()
            energy = self.energy_sem + 2 * cross + artifact
            return (energy - self.energy0).abs() / self.energy0
        raise ValueError(f"unknown spectral mode {mode!r}")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"K={self.num_subspaces}, m={self.subspace_rank}, semantic_guard={self.semantic_guard}"
        )


_ROW_ATTRIBUTES = frozenset(LAYER_TENSORS)
_LAYOUT_ATTRIBUTES = frozenset(
    (
        "in_features",
        "out_features",
        "num_subspaces",
        "subspace_rank",
        "semantic_guard",
        "guard_rank",
        "u_complement",
        "v_complement",
    )
)


def _join_per_subspace_keys(state_dict: dict, prefix: str, num_subspaces: int) -> None:
    """Checkpoints written before the subspaces were batched hold ``U.0 … U.{K-1}`` (and ``s.k``, ``V.k``);
    join them into the one tensor per factor the layer has now."""
    for name in ("U", "s", "V"):
        keys = [f"{prefix}{name}.{k}" for k in range(num_subspaces)]
        if prefix + name in state_dict or not all(key in state_dict for key in keys):
            continue
        parts = [state_dict.pop(key) for key in keys]
        state_dict[prefix + name] = torch.cat(parts, dim=-1)


def layer_groups(model_or_layers) -> list[LayerGroup]:
    """The layer groups of a model's MASM layers (or of a list of layers), each once, in model order.

    A model prepared by :func:`~masm.method.apply_masm` has its layers grouped by shape already; a layer
    built on its own is a group of one.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = [m for m in model_or_layers.modules() if isinstance(m, MASMLinear)]
    else:
        layers = list(model_or_layers)
    seen: dict[int, LayerGroup] = {}
    for layer in layers:
        seen.setdefault(id(layer.group), layer.group)
    return list(seen.values())

"""The MASM adapter layer: a pretrained ``nn.Linear`` split into a frozen semantic part and K trainable
artifact subspaces (method.md §1–3).

Like PEFT's LoRA and OSF layers, :class:`MASMLinear` takes the place of the original Linear, keeps the
frozen factors as buffers and the trainable ones as Parameters, and :meth:`MASMLinear.merge` turns it back
into a plain ``nn.Linear``. Unlike Effort's reference code, backward computes no full-size weight gradient:
the factors' gradients come from thin low-rank products, and the ``d_out × d_in`` matrix the forward uses
is built from them once per optimizer step, outside autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MASMConfig
from .decomposition import SVD, residual_groups


class MASMLinear(nn.Module):
    """``y = x W_semᵀ + b + ((x V) ⊙ s) Uᵀ``, the K subspaces side by side in one tensor per factor.

    Parameters: ``U`` (d_out×Km), ``s`` (Km), ``V`` (d_in×Km); subspace ``k`` is columns ``k·m:(k+1)·m``
    of each (:meth:`subspace_columns`). One tensor per factor keeps every per-step operation batched: the
    forward, the guard, the regularisers and the mask's statistics take one kernel per layer (or per shape
    group), not one per subspace. Per-subspace masking happens around the optimizer step
    (:class:`~masm.method.SelectiveMaskController`).

    Buffers: ``weight_sem`` (frozen semantic weight), ``bias`` (frozen), ``sigma0`` (initial singular
    values of each subspace, for the spectral loss), ``energy0`` / ``energy_sem`` (squared Frobenius
    norms) and, when the semantic guard is on, ``U_basis`` / ``V_basis`` (the guarded basis of a side, or
    its complement where that side is square and the complement smaller).
    """

    def __init__(self, base: nn.Linear, svd: SVD, config: MASMConfig):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.num_subspaces = config.num_subspaces
        self.subspace_rank = config.subspace_rank
        self.semantic_guard = config.semantic_guard
        n = min(self.in_features, self.out_features)
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
        self.register_buffer("weight_sem", weight_sem.to(device, dtype))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self._fused: tuple | None = None  # (key, FusedOperands): see _fused_operands
        self.U = nn.Parameter(U[:, residual].to(device, torch.float32).contiguous())
        self.s = nn.Parameter(S[residual].to(device, torch.float32).contiguous())
        self.V = nn.Parameter(Vh[residual].T.to(device, torch.float32).contiguous())
        sigma0 = torch.stack([S[g].sort(descending=True).values for g in groups]).float()
        self.register_buffer("sigma0", sigma0.to(device))
        self.register_buffer("energy0", weight.pow(2).sum().float().to(device))
        self.register_buffer("energy_sem", weight_sem.pow(2).sum().float().to(device))
        self.guard_rank = min(rank_sem, max(1, round(config.guard_rank * n)))
        if config.semantic_guard != "off":
            # The guard keeps the artifact factors out of the top r_g principal directions only (method.md
            # §3): a guard over all r frozen directions would confine them to the initial residual span.
            # Each side stores the smaller of the guarded basis (d × r_g) and, where the side is square,
            # its complement (d × (n − r_g)); both give the same projection.
            self.u_complement = self.out_features == n and n - self.guard_rank < self.guard_rank
            self.v_complement = self.in_features == n and n - self.guard_rank < self.guard_rank
            g = self.guard_rank
            U_basis = U[:, g:] if self.u_complement else U[:, :g]
            V_basis = Vh[g:].T if self.v_complement else Vh[:g].T
            self.register_buffer("U_basis", U_basis.to(device, torch.float32).contiguous())
            self.register_buffer("V_basis", V_basis.to(device, torch.float32).contiguous())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _join_per_subspace_keys(state_dict, prefix, self.num_subspaces)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- forward and merge ------------------------------------------------------------------------------
    def subspace_columns(self, k: int) -> slice:
        """The columns of ``U`` and ``V`` (and entries of ``s``) that make up artifact subspace ``k``."""
        return slice(k * self.subspace_rank, (k + 1) * self.subspace_rank)

    def subspace(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(U_k, s_k, V_k)`` of artifact subspace ``k``."""
        cols = self.subspace_columns(k)
        return self.U[:, cols], self.s[cols], self.V[:, cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Mixed precision: the hand-written backward in the autocast dtype (autocast would otherwise
            # leave the custom Function and fall back to plain autograd); fp32 factors get fp32 gradients.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                operands = self._fused_operands(dtype)
                return _LowRankLinear.apply(x.to(dtype), *operands.arguments, self.U, self.s, self.V)
        operands = self._fused_operands(x.dtype)  # without autocast: in x's dtype (e.g. a half backbone)
        return _LowRankLinear.apply(x, *operands.arguments, self.U, self.s, self.V)

    def _fused_operands(self, dtype: torch.dtype) -> FusedOperands:
        """``[[W_sem + U (V s)ᵀ, U], [(V s)ᵀ, 0]]`` and ``[b, 0]`` in ``dtype``, rebuilt when a factor, a buffer
        or the dtype changed (once per optimizer step in training, whatever the number of forwards).

        With it a training forward is one matmul, ``x [W_eff; (V s)ᵀ]ᵀ = [y | x V s]``, and backward one more,
        ``g [W_eff | U] = [dx | g U]``: the low-rank terms ride along as Km extra output columns of the
        matmul that any adapter of the layer pays for, instead of thin matmuls that read the activations again
        and rank-Km updates that rewrite them. The cost is one ``d_out × d_in`` matrix per layer, built from
        the factors without autograd (backward computes no weight gradient of it).
        """
        tensors = (self.U, self.s, self.V, self.weight_sem) + (() if self.bias is None else (self.bias,))
        key = (dtype, *((t.data_ptr(), t._version) for t in tensors))
        if self._fused is None or self._fused[0] != key:
            # Overwritten in place when only the factors changed: a forward whose backward has not run yet
            # then fails autograd's version check (it saved these operands) instead of using new values.
            operands = None if self._fused is None else self._fused[1]
            if operands is None or not operands.fits(dtype, self.U.device):
                operands = FusedOperands(
                    self.out_features, self.in_features, self.U.shape[1], dtype, self.U.device, self.bias
                )
            with torch.no_grad():
                operands.fill(self.weight_sem, self.bias, self.U, self.s, self.V)
            self._fused = (key, operands)
        return self._fused[1]

    def __getstate__(self):  # a copy (deepcopy, pickle) builds its own operands from its own tensors
        return {**self.__dict__, "_fused": None}

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: the operands are rebuilt on next use
        self._fused = None
        return super()._apply(fn, *args, **kwargs)

    def merged_weight(self) -> torch.Tensor:
        return self.weight_sem + ((self.U * self.s) @ self.V.T).to(self.weight_sem.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (for inference at the backbone's speed)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight_sem.device,
            dtype=self.weight_sem.dtype,
        )
        linear.weight.copy_(self.merged_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # -- terms of the regularisers (method.md §3), batched over layers in :mod:`.losses` --------------------
    def semantic_overlap(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``‖U_gᵀ U‖² + ‖V_gᵀ V‖²`` over the guarded directions (via ``‖Q‖² − ‖Bᵀ Q‖²`` where the stored
        basis B is the complement)."""
        return _overlap(U, self.U_basis, self.u_complement) + _overlap(V, self.V_basis, self.v_complement)

    def spectral_loss(self, mode: str = "artifact") -> torch.Tensor:
        """Spectral consistency.

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


def _join_per_subspace_keys(state_dict: dict, prefix: str, num_subspaces: int) -> None:
    """Checkpoints written before the subspaces were batched hold ``U.0 … U.{K-1}`` (and ``s.k``, ``V.k``);
    join them into the one tensor per factor the layer has now."""
    for name in ("U", "s", "V"):
        keys = [f"{prefix}{name}.{k}" for k in range(num_subspaces)]
        if prefix + name in state_dict or not all(key in state_dict for key in keys):
            continue
        parts = [state_dict.pop(key) for key in keys]
        state_dict[prefix + name] = torch.cat(parts, dim=-1)


class FusedOperands:
    """The operands of :class:`_LowRankLinear` for one layer: ``[[W_eff, U], [(V s)ᵀ, 0]]`` and ``[b, 0]`` in
    one buffer each, and the views that forward, backward and :meth:`fill` read or write.

    The views are made once, with the buffers, so that a step dispatches no slicing: on a GPU with small
    batches a step is bound by the number of operations launched, not by their arithmetic.
    """

    def __init__(self, d_out: int, d_in: int, km: int, dtype, device, bias: torch.Tensor | None):
        self.weights = torch.zeros(d_out + km, d_in + km, dtype=dtype, device=device)
        self.bias = None if bias is None else torch.zeros(d_out + km, dtype=dtype, device=device)
        self.forward = self.weights[:, :d_in].T  # x @ forward + bias = [y | x V s]
        self.backward = self.weights[:d_out]  # g @ backward = [dx | g U]
        self.w_eff = self.weights[:d_out, :d_in]
        self.u_block = self.weights[:d_out, d_in:]
        self.vs_block = self.weights[d_out:, :d_in].T  # d_in × Km: V s goes in without a transpose
        self.bias_block = None if bias is None else self.bias[:d_out]
        self._bias_key: tuple | None = None  # the frozen bias is copied in only when it changed
        self.arguments = (self.forward, self.bias, self.backward)  # as _LowRankLinear.apply takes them

    def fits(self, dtype, device) -> bool:
        return self.weights.dtype == dtype and self.weights.device == device

    def fill(self, weight_sem, bias, U, s, V) -> FusedOperands:
        """Write ``W_sem + U (V s)ᵀ``, ``U``, ``V s`` and ``b`` into place (the sum in the factors' precision)."""
        Vs = V * s
        if self.weights.dtype == U.dtype == weight_sem.dtype:
            torch.addmm(weight_sem, U, Vs.T, out=self.w_eff)  # straight into place
        else:
            self.w_eff.copy_(torch.addmm(weight_sem.to(U.dtype), U, Vs.T))
        self.u_block.copy_(U)
        self.vs_block.copy_(Vs)
        if bias is not None and self._bias_key != (bias.data_ptr(), bias._version):
            self.bias_block.copy_(bias)
            self._bias_key = (bias.data_ptr(), bias._version)
        return self


def fuse(weight_sem, bias, U, s, V, dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fresh operands of :class:`_LowRankLinear` (``forward``, ``bias``, ``backward``), in ``dtype``."""
    operands = FusedOperands(*weight_sem.shape, U.shape[1], dtype, weight_sem.device, bias)
    return operands.fill(weight_sem, bias, U, s, V).arguments


class _LowRankLinear(torch.autograd.Function):
    """``x W_semᵀ + b + ((x V) ⊙ s) Uᵀ`` with a hand-written backward, from the operands of :func:`fuse`.

    forward:  ``[y | x V s] = x [W_eff; (V s)ᵀ]ᵀ + [b, 0]``, one matmul, with ``W_eff = W_sem + U (V s)ᵀ``;
    backward: ``[dx | g U] = g [W_eff | U]``, one matmul, and the factors' gradients from the thin
    ``x V s`` and ``g U`` (Km × d products, no ``d_out × d_in`` weight gradient).
    """

    @staticmethod
    def forward(ctx, x, forward, bias, backward, U, s, V):
        d_in, d_out = forward.shape[0], backward.shape[0]
        x2 = x.reshape(-1, d_in)
        both = x2 @ forward if bias is None else torch.addmm(bias, x2, forward)
        # x V s is copied out (tokens × Km) so that backward does not keep the whole output alive
        ctx.save_for_backward(x2, backward, V, s, both[:, d_out:].clone())
        ctx.shapes = (x.shape, d_out, d_in)
        return _rows_for_device(both[:, :d_out]).view(*x.shape[:-1], d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2, backward, V, s, low_rank = ctx.saved_tensors
        x_shape, d_out, d_in = ctx.shapes
        g = grad_out.reshape(-1, d_out)
        grad_x = grad_U = grad_s = grad_V = None
        if ctx.needs_input_grad[0]:
            both = g @ backward  # [g W_eff | g U]
            grad_x, g_low = _rows_for_device(both[:, :d_in]).view(x_shape), both[:, d_in:]
        else:
            g_low = g @ backward[:, d_in:]
        if ctx.needs_input_grad[4]:
            grad_U = _thin_product(g, low_rank).to(V.dtype)  # d_out × Km
        if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
            grad_Vs = _thin_product(x2, g_low).to(V.dtype)  # d_in × Km
            grad_s = (grad_Vs * V).sum(0)
            grad_V = grad_Vs * s
        return grad_x, None, None, None, grad_U, grad_s, grad_V


def _thin_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ b`` (d × Km), reduced over the tokens.

    On CPU as ``(bᵀ a)ᵀ``: the reduction then runs along contiguous rows, faster even counting the copy
    autograd makes of the transposed result (328 µs against 425 µs for ViT-B/16 shapes, batch 8). Elsewhere
    directly, which the BLAS handles as well and which leaves autograd nothing to copy: on a GPU a step is
    bound by the number of operations launched.
    """
    return (b.T @ a).T if a.device.type == "cpu" else a.T @ b


def _rows_for_device(columns: torch.Tensor) -> torch.Tensor:
    """The leading columns of a fused product, as the next operation can take them.

    On CPU the strided view goes on as it is (a copy costs a pass over the activations, measurable there).
    CUDA's attention kernels reject it: the memory-efficient kernel needs aligned row strides ("query is
    not correctly aligned") and cuDNN's attention fails on them in backward, so off CPU the rows are made
    contiguous; the copy is a small fraction of a GPU step.
    """
    return columns if columns.device.type == "cpu" else columns.contiguous()


def _project(grad: torch.Tensor, basis: torch.Tensor, is_complement: bool) -> torch.Tensor:
    """``(I − U_sem U_semᵀ) grad``, from the semantic basis or from its complement; batched over leading
    dimensions (a :class:`~masm.method.LayerGroup` passes its layers stacked)."""
    inside = basis @ (basis.mT @ grad)
    return inside if is_complement else grad - inside


def _overlap(Q: torch.Tensor, basis: torch.Tensor, is_complement: bool) -> torch.Tensor:
    """``‖U_semᵀ Q‖²_F``, from the semantic basis or from its complement."""
    if is_complement:
        return (Q.pow(2).sum() - (basis.T @ Q).pow(2).sum()).clamp_min(0)
    return (basis.T @ Q).pow(2).sum()

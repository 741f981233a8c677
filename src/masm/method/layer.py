"""The MASM adapter layer: a pretrained ``nn.Linear`` split into a frozen semantic part and K trainable
artifact subspaces (method.md §1–3).

Like PEFT's LoRA and OSF layers, :class:`MASMLinear` takes the place of the original Linear, keeps the
frozen factors as buffers and the trainable ones as Parameters, and :meth:`MASMLinear.merge` turns it back
into a plain ``nn.Linear``. Unlike Effort's reference code it never rebuilds a ``d_out × d_in`` matrix
during training: the artifact part is applied through its low-rank factors, so backward computes no
full-size weight gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MASMConfig
from .decomposition import SVD, residual_groups


class MASMLinear(nn.Module):
    """``y = x W_semᵀ + b + ((x V_cat) ⊙ s_cat) U_catᵀ``.

    Buffers: ``weight_sem`` (frozen semantic weight), ``bias`` (frozen), ``sigma0`` (initial singular
    values of each subspace, for the spectral loss), ``energy0`` / ``energy_sem`` (squared Frobenius
    norms for Effort's energy loss) and, when the semantic guard is on, ``U_basis`` / ``V_basis`` (the
    semantic basis of a side, or its complement where that side is square and the complement smaller).
    Parameters: ``U[k]`` (d_out×m), ``s[k]`` (m), ``V[k]`` (d_in×m) for k = 0..K-1.
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

        residual = torch.cat(groups)
        # W_sem = W - (residual part), in the SVD's precision: the layer then reproduces W to round-off
        # whatever the truncation, and W itself is not kept.
        weight_res = (U[:, residual] * S[residual]) @ Vh[residual]
        self.register_buffer("weight_sem", (weight - weight_res).to(device, dtype))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.U = nn.ParameterList([nn.Parameter(U[:, g].to(device, torch.float32)) for g in groups])
        self.s = nn.ParameterList([nn.Parameter(S[g].to(device, torch.float32)) for g in groups])
        self.V = nn.ParameterList([nn.Parameter(Vh[g].T.to(device, torch.float32)) for g in groups])
        sigma0 = torch.stack([S[g].sort(descending=True).values for g in groups]).float()
        self.register_buffer("sigma0", sigma0.to(device))
        self.register_buffer("energy0", weight.pow(2).sum().float().to(device))
        self.register_buffer("energy_sem", (weight - weight_res).pow(2).sum().float().to(device))
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

    # -- forward and merge ------------------------------------------------------------------------------
    def artifact_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_cat, s_cat, V_cat)``: the K subspaces side by side (d_out×Km, Km, d_in×Km).

        In ``project`` mode the factors are used projected out of the guarded directions, so the guard is
        part of the function itself: gradients reach ``U``/``V`` already projected (the chain rule through
        the projection), nothing the optimizer does to the stored tensors can leak into the guarded
        span, and a copy of the model (``copy.deepcopy``, pickling) keeps the guard. :meth:`reproject_`
        also projects the stored tensors after each optimizer step, so that what is saved is what is used.
        """
        U, s, V = torch.cat(list(self.U), 1), torch.cat(list(self.s)), torch.cat(list(self.V), 1)
        if self.semantic_guard == "project":
            U = _project(U, self.U_basis, self.u_complement)
            V = _project(V, self.V_basis, self.v_complement)
        return U, s, V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, s, V = self.artifact_factors()
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Mixed precision: everything in the autocast dtype, through the same hand-written backward
            # (autocast would otherwise leave the custom Function and fall back to plain autograd). The
            # casts of the fp32 factors are differentiable, so their gradients arrive in fp32.
            dtype = torch.get_autocast_dtype(device)
            weight = self.weight_sem.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _LowRankLinear.apply(x.to(dtype), weight, bias, U.to(dtype), s.to(dtype), V.to(dtype))
        weight, bias = self.weight_sem, self.bias
        if x.dtype != U.dtype:  # e.g. a half-precision backbone without autocast: compute in x's dtype
            U, s, V, weight = U.to(x.dtype), s.to(x.dtype), V.to(x.dtype), weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return _LowRankLinear.apply(x, weight, bias, U, s, V)

    def merged_weight(self) -> torch.Tensor:
        U, s, V = self.artifact_factors()
        return self.weight_sem + ((U * s) @ V.T).to(self.weight_sem.dtype)

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

    def subspace_parameters(self, k: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """The trainable tensors of artifact subspace ``k``: ``(U_k, s_k, V_k)``."""
        return self.U[k], self.s[k], self.V[k]

    # -- regularisers (method.md §3) ----------------------------------------------------------------------
    def orthogonality_loss(self) -> torch.Tensor:
        """``(‖Q_Uᵀ Q_U − I‖² + ‖Q_Vᵀ Q_V − I‖²) / (K·m)``, plus the semantic penalty in ``penalty`` mode.

        Gram matrices are Km×Km (``QᵀQ``), not d×d: that is what orthonormal columns mean.
        """
        U, _, V = self.artifact_factors()
        eye = torch.eye(U.shape[1], device=U.device, dtype=U.dtype)
        loss = (U.T @ U - eye).pow(2).sum() + (V.T @ V - eye).pow(2).sum()
        if self.semantic_guard == "penalty":
            loss = loss + self.semantic_overlap(U, V)
        return loss / U.shape[1]

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
        if mode == "artifact":
            U, s, V = self.artifact_factors()
            m = self.subspace_rank
            sigma = []
            for k in range(self.num_subspaces):
                _, r_u = torch.linalg.qr(U[:, k * m : (k + 1) * m])
                _, r_v = torch.linalg.qr(V[:, k * m : (k + 1) * m])
                sigma.append(torch.linalg.svdvals((r_u * s[k * m : (k + 1) * m]) @ r_v.T))
            sigma = torch.stack(sigma)
            return (sigma - self.sigma0).pow(2).sum() / self.energy0
        if mode == "energy":
            U, s, V = self.artifact_factors()
            # ‖W_sem + U diag(s) Vᵀ‖² = ‖W_sem‖² + 2 Σ_j s_j u_jᵀ W_sem v_j + Σ_ij s_i s_j (UᵀU)_ij (VᵀV)_ij
            cross = ((self.weight_sem.float() @ V) * U).sum(0) @ s
            artifact = ((U.T @ U) * (V.T @ V) * s[:, None] * s[None, :]).sum()
            energy = self.energy_sem + 2 * cross + artifact
            return (energy - self.energy0).abs() / self.energy0
        raise ValueError(f"unknown spectral mode {mode!r}")

    # -- semantic guard by projection -------------------------------------------------------------------
    @torch.no_grad()
    def reproject_(self, updated_only: bool = True) -> None:
        """Project the stored ``U_k``, ``V_k`` out of the guarded directions (``project`` mode; else a no-op).

        Called after every optimizer step: Adam's per-element scaling and weight decay move the stored
        tensors out of the complement even though their gradients lie in it. With ``updated_only`` a
        subspace without a gradient (paused by the mask) is left bit-for-bit as it is.
        """
        if self.semantic_guard != "project":
            return
        for k in range(self.num_subspaces):
            for param, basis, complement in (
                (self.U[k], self.U_basis, self.u_complement),
                (self.V[k], self.V_basis, self.v_complement),
            ):
                if not updated_only or param.grad is not None:
                    param.copy_(_project(param, basis, complement))

    def guard_overlap(self) -> float:
        """``(‖U_gᵀ U‖² + ‖V_gᵀ V‖²) / (‖U‖² + ‖V‖²)`` of the stored factors: 0 when the guard holds."""
        with torch.no_grad():
            U, V = torch.cat(list(self.U), 1), torch.cat(list(self.V), 1)
            overlap = self.semantic_overlap(U, V)
            return float(overlap / (U.pow(2).sum() + V.pow(2).sum()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"K={self.num_subspaces}, m={self.subspace_rank}, semantic_guard={self.semantic_guard}"
        )


class _LowRankLinear(torch.autograd.Function):
    """``x W_semᵀ + b + ((x V) ⊙ s) Uᵀ`` with a hand-written backward.

    Autograd on the plain expression makes two extra passes over every (tokens × d) activation gradient:
    it computes the input gradient of the low-rank branch as a separate tensor and then adds it to the
    frozen branch's. Here the low-rank term is added in the matmul epilogue of the frozen one, in forward
    (``out += lr Uᵀ``) and in backward (``dx += (g U) (V s)ᵀ``). No ``d_out × d_in`` matrix is formed and
    no weight gradient of ``W_sem`` is computed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, U, s, V):
        x2 = x.reshape(-1, x.shape[-1])
        Vs = V * s  # s scales the small d_in × Km factor, not the (tokens × Km) activation
        low_rank = x2 @ Vs
        out = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        out.addmm_(low_rank, U.T)
        ctx.save_for_backward(x, weight, U, s, V, low_rank)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, U, s, V, low_rank = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_low = g @ U  # tokens × Km
        grad_x = grad_U = grad_s = grad_V = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_low, (V * s).T).view(x.shape)
        # Km × d products, transposed afterwards: the reduction over tokens then runs along contiguous rows
        # (measured 1.5x faster on CPU than tokens-transposed × (tokens × Km)).
        if ctx.needs_input_grad[3]:
            grad_U = (low_rank.T @ g).T
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_Vs = (g_low.T @ x.reshape(-1, x.shape[-1])).T  # d_in × Km
            grad_s = (grad_Vs * V).sum(0)
            grad_V = grad_Vs * s
        return grad_x, None, None, grad_U, grad_s, grad_V


def _project(grad: torch.Tensor, basis: torch.Tensor, is_complement: bool) -> torch.Tensor:
    """``(I − U_sem U_semᵀ) grad``, from the semantic basis or from its complement."""
    if is_complement:
        return basis @ (basis.T @ grad)
    return grad - basis @ (basis.T @ grad)


def _overlap(Q: torch.Tensor, basis: torch.Tensor, is_complement: bool) -> torch.Tensor:
    """``‖U_semᵀ Q‖²_F``, from the semantic basis or from its complement."""
    if is_complement:
        return (Q.pow(2).sum() - (basis.T @ Q).pow(2).sum()).clamp_min(0)
    return (basis.T @ Q).pow(2).sum()

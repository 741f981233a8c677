"""A faithful re-implementation of how Effort's reference code trains its SVD layer, for benchmarking.

Effort (ICML 2025) keeps ``W_main`` (the principal part) frozen and trains a residual ``U_r, S_r, V_r``;
its released code rebuilds the full weight ``W = W_main + U_r diag(S_r) V_rᵀ`` on every forward call and
applies it with a dense matmul. Autograd therefore computes a full ``d_out × d_in`` weight gradient in every
backward pass before reducing it to the residual factors. This module reproduces exactly that formula
(written from the paper's description, not from its CC BY-NC code) so that ``masm bench speed`` can
compare MASM's low-rank path against it. It is a benchmark baseline only, not a training method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..method.apply import find_targets, replace_module
from ..method.config import ATTENTION_TARGETS
from ..method.decomposition import decompose


class EffortReferenceLinear(nn.Module):
    def __init__(self, base: nn.Linear, residual_rank: int = 1):
        super().__init__()
        svd = decompose(base.weight, "float64", None)
        r = min(base.in_features, base.out_features) - residual_rank
        dtype = base.weight.dtype
        main = (svd.U[:, :r] * svd.S[:r]) @ svd.Vh[:r]
        self.register_buffer("weight_main", main.to(dtype))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.U_residual = nn.Parameter(svd.U[:, r:].to(dtype))
        self.S_residual = nn.Parameter(svd.S[r:].to(dtype))
        self.V_residual = nn.Parameter(svd.Vh[r:].T.contiguous().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_main + self.U_residual @ torch.diag(self.S_residual) @ self.V_residual.T
        return F.linear(x, weight, self.bias)


def apply_effort_reference(model: nn.Module, target_modules: str = ATTENTION_TARGETS, residual_rank: int = 1):
    """Replace the targeted Linears by :class:`EffortReferenceLinear`; only residual factors train."""
    targets = find_targets(model, target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in targets:
        replace_module(model, name, EffortReferenceLinear(linear, residual_rank))
    return model

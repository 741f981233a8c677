"""The arithmetic of MASM layers: the operands a layer group builds once per forward pass, and the autograd
functions of a layer's forward and backward.

A layer group (:class:`~masm.method.LayerGroup`) builds its layers' operands here and a layer
(:class:`~masm.method.MASMLinear`) runs :class:`_LowRankLinear` on them; both depend on this module, and
it on neither.
"""

from __future__ import annotations

import torch
from torch import nn


def operand_dtype(group: nn.Module, x: torch.Tensor | None = None) -> torch.dtype:
    """The dtype of a layer group's operands: autocast's in mixed precision, else the input's (the frozen
    weight's when no input is at hand)."""
    device = group.U.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return group.weight_sem.dtype if x is None else x.dtype


def fill_operands(U, s, V, weight_sem, dtype, out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands of a group's layers (leading dimension: layers), in ``dtype``: ``(W_eff, V s, U)``
    with ``W_eff = W_sem + U (V s)ᵀ``, the sum in the factors' precision.

    With them a layer's forward is ``y = x W_effᵀ + b`` and ``x (V s)``, its backward ``dx = g W_eff`` and
    ``g U``, plus the two thin gradients: the low-rank factors never enter the big matmuls, which keep the
    plain Linear's shapes (and its contiguous outputs). One batched product builds every layer's
    ``W_eff``. ``out``: ``(W_eff,)`` of an earlier call to write into (see
    :meth:`LayerGroup.reusable_operands`), or ``None``.
    """
    Vs = V * s.unsqueeze(1)
    target = None if out is None or torch.compiler.is_compiling() else out[0]  # compile allocates itself
    if dtype == U.dtype == weight_sem.dtype:
        weights = torch.baddbmm(weight_sem, U, Vs.mT, out=target)
    elif target is not None:
        weights = target.copy_(torch.baddbmm(weight_sem.to(U.dtype), U, Vs.mT))
    else:
        weights = torch.baddbmm(weight_sem.to(U.dtype), U, Vs.mT).to(dtype)
    # detached: the big matmuls' operands are not differentiable (the tokens carry the factors' gradients)
    return weights, Vs.to(dtype), U.detach().to(dtype)


class _GroupOperands(torch.autograd.Function):
    """The operands of a group (:func:`fill_operands`), and for each factor side a token whose gradient is
    the layers' thin gradient, transposed: ``∂L/∂Uᵀ`` (layers × Km × d_out) and ``∂L/∂(V s)ᵀ`` (layers ×
    Km × d_in). Backward turns them into the factors' gradients, for the whole group at once: the layers'
    gradients arrive stacked (autograd's ``unbind`` backward), never added up one by one.
    """

    @staticmethod
    def forward(ctx, U, s, V, weight_sem, dtype, out):
        weights, Vs, U_op = fill_operands(U, s, V, weight_sem, dtype, out)
        layers, d_out, km = U.shape
        # Tokens carry no values (a broadcast scalar): only their gradients matter. Km × d per layer, the
        # layout in which the layers compute them.
        u_token = weights.new_empty((1, 1, 1)).expand(layers, km, d_out)
        vs_token = weights.new_empty((1, 1, 1)).expand(layers, km, V.shape[1])
        ctx.save_for_backward(s, V)
        ctx.factor_dtype = U.dtype
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the operands
        ctx.mark_non_differentiable(weights, Vs, U_op)
        return weights, Vs, U_op, u_token, vs_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _weights, _Vs, _U, grad_u, grad_vs):
        s, V = ctx.saved_tensors
        grad_U = grad_s = grad_V = None
        if grad_u is not None:
            grad_U = grad_u.mT.to(ctx.factor_dtype)
        if grad_vs is not None:
            grad_vs = grad_vs.mT.to(ctx.factor_dtype)
            grad_s = (grad_vs * V).sum(1)
            grad_V = grad_vs * s.unsqueeze(1)
        return grad_U, grad_s, grad_V, None, None, None


def group_operands(U, s, V, weight_sem, bias, dtype, track: bool, out=None) -> tuple[list[tuple], tuple]:
    """Per layer: ``(W_eff, bias, U, V s, u_token, vs_token)`` as :class:`_LowRankLinear` takes them
    (tokens ``None`` when the factors' gradients are not needed); and the ``(W_eff,)`` storage they view.
    ``out``: as for :func:`fill_operands`."""
    if track:
        weights, Vs, U_op, u_token, vs_token = _GroupOperands.apply(U, s, V, weight_sem, dtype, out)
        u_tokens, vs_tokens = u_token.unbind(0), vs_token.unbind(0)
    else:
        with torch.no_grad():
            weights, Vs, U_op = fill_operands(U, s, V, weight_sem, dtype, out)
        u_tokens = vs_tokens = (None,) * U.shape[0]
    biases = (None,) * U.shape[0] if bias is None else bias.to(dtype).unbind(0)
    per_layer = zip(weights.unbind(0), biases, U_op.unbind(0), Vs.unbind(0), u_tokens, vs_tokens)
    return list(per_layer), (weights,)


class _LowRankLinear(torch.autograd.Function):
    """``x W_semᵀ + b + ((x V) ⊙ s) Uᵀ`` with a hand-written backward, from the operands of
    :func:`group_operands`.

    forward:  ``y = x W_effᵀ + b`` with ``W_eff = W_sem + U (V s)ᵀ``, and ``x V s`` (tokens × Km) for
    backward; backward: ``dx = g W_eff``, and the thin gradients of the tokens, ``∂L/∂U = gᵀ (x V s)`` and
    ``∂L/∂(V s) = xᵀ (g U)`` (Km × d products, no ``d_out × d_in`` weight gradient), which
    :class:`_GroupOperands` turns into the factors' gradients. The big matmuls are the plain Linear's, with
    its shapes and contiguous outputs: on the CPU, folding the thin products into them as Km extra columns
    made a ViT-B/16 block slower (odd-width matmuls, strided outputs copied downstream).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, U, Vs, u_token, vs_token):
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)
        y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        track = u_token is not None or vs_token is not None
        low_rank = x2 @ Vs if track else None  # x V s, tokens × Km
        ctx.save_for_backward(x2, weight, U, low_rank)
        ctx.shapes = (x.shape, d_out, d_in)
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2, weight, U, low_rank = ctx.saved_tensors
        x_shape, d_out, d_in = ctx.shapes
        g = grad_out.reshape(-1, d_out)
        grad_x = grad_u = grad_vs = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).view(x_shape)
        # The thin gradients as Km × d (the tokens' layout): (x V s)ᵀ g and (g U)ᵀ x reduce over the tokens
        # along contiguous rows, and need one transpose each, not two.
        if ctx.needs_input_grad[5]:
            grad_u = low_rank.T @ g  # Km × d_out
        if ctx.needs_input_grad[6]:
            grad_vs = (g @ U).T @ x2  # Km × d_in
        return grad_x, None, None, None, None, grad_u, grad_vs


def low_rank_linear(x, weight_sem, bias, U, s, V) -> torch.Tensor:
    """What a layer computes, from plain tensors of one layer, differentiable in ``x`` and the factors (a
    functional form of :class:`MASMLinear`, e.g. to check its hand-written backward)."""
    rows = [t.unsqueeze(0) for t in (U, s, V, weight_sem)]
    dtype = x.dtype
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (U, s, V))
    b = None if bias is None else bias.unsqueeze(0)
    operands = group_operands(*rows, b, dtype, track)[0][0]
    return _LowRankLinear.apply(x, *operands)

"""Same-shape MASM layers, handled together: one batched kernel per group instead of one per layer.

On a GPU a training step of a ViT with small batches is bound by kernel launches and Python dispatch, not by
arithmetic: ViT-L/14 has 96 adapted layers, and a guard applied layer by layer costs ~8 kernels per layer,
twice per step. A :class:`LayerGroup` stacks its layers' tensors and runs the guard (and, in
:mod:`.losses`, the regularisers) as a few batched matmuls for the whole group.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .layer import MASMLinear, _project


class LayerGroup(list):
    """MASM layers of one shape, K, m and guard, in model order (a ``list`` of :class:`MASMLinear`).

    Keeps its layers' guarded bases stacked (``L × d × c`` per side), rebuilt only when a basis changes
    (moved to another device, loaded): the copy costs the bases' memory once more, which buys the guard's
    two projections per step as a handful of kernels for the whole group.
    """

    def __init__(self, layers=()):
        super().__init__(layers)
        self._bases_key: tuple | None = None
        self._bases: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def guarded(self) -> bool:
        return bool(self) and self[0].semantic_guard == "project"

    def stacked_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U bases, V bases)`` of the group's layers, stacked: ``L × d_out × c`` and ``L × d_in × c``."""
        tensors = [t for layer in self for t in (layer.U_basis, layer.V_basis)]
        key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
        if self._bases is None or key != self._bases_key:
            self._bases = (torch.stack(tensors[0::2]), torch.stack(tensors[1::2]))
            self._bases_key = key
        return self._bases

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """Every layer's ``U``/``V`` gradient projected out of its guarded directions (``project`` mode;
        else a no-op), batched over the group.

        Called between backward and the optimizer step, so Adam's moments only ever see the complement.
        """
        if self.guarded:
            self._project_(lambda p: p.grad)

    @torch.no_grad()
    def reproject_(self, updated_only: bool = True) -> None:
        """Every layer's stored ``U``/``V`` projected out of its guarded directions (``project`` mode; else
        a no-op), batched over the group.

        Called after every optimizer step: Adam's per-element scaling and weight decay move the stored
        tensors out of the complement even though their gradients lie in it. With ``updated_only`` a factor
        without a gradient (its layer paused whole by the mask) is left bit for bit as it is.
        """
        if self.guarded:
            self._project_(lambda p: p if not updated_only or p.grad is not None else None)

    def _project_(self, target) -> None:
        """``t ← (I − B Bᵀ) t`` for ``t = target(factor)`` of every layer and side (skipped where ``None``)."""
        first = self[0]
        bases = self.stacked_bases()
        for side, (name, complement) in enumerate((("U", first.u_complement), ("V", first.v_complement))):
            tensors = [target(getattr(layer, name)) for layer in self]
            rows = [i for i, t in enumerate(tensors) if t is not None]
            if not rows:
                continue
            basis = bases[side] if len(rows) == len(self) else bases[side][rows]
            projected = _project(torch.stack([tensors[i] for i in rows]), basis, complement)
            torch._foreach_copy_([tensors[i] for i in rows], list(projected.unbind(0)))


def layer_groups(model_or_layers: nn.Module | list[MASMLinear]) -> list[LayerGroup]:
    """The MASM layers of a model (or of a list of layers) grouped by shape, K, m and guard.

    Computed once by a trainer and passed to :func:`~masm.method.total_loss` and
    :func:`~masm.method.subspace_update`, so a step neither walks the module tree nor loops over layers.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = [m for m in model_or_layers.modules() if isinstance(m, MASMLinear)]
    else:
        layers = list(model_or_layers)
    groups: dict[tuple, LayerGroup] = defaultdict(LayerGroup)
    for layer in layers:
        key = (
            layer.out_features,
            layer.in_features,
            layer.num_subspaces,
            layer.subspace_rank,
            layer.semantic_guard,
            getattr(layer, "u_complement", None),
            getattr(layer, "v_complement", None),
            layer.guard_rank,
        )
        groups[key].append(layer)
    return list(groups.values())

"""Same-shape MASM layers, stored together: one tensor per factor for the whole group.

On a GPU a training step of a ViT with small batches is bound by the number of operations dispatched, not
by arithmetic: ViT-B/16 has 48 adapted attention projections and ViT-L/14 96, all of one shape. A
:class:`LayerGroup` keeps the factors of its layers as one Parameter each (``U``: layers × d_out × Km,
``s``: layers × Km, ``V``: layers × d_in × Km) and the frozen tensors as one buffer each; a layer reads
row ``i`` of them. So the optimizer, the guard, the regularisers and the mask's statistics take a handful of
operations per group, whatever its size, and the operands every layer's matmuls read are built for
the whole group in one batched product per forward pass.

The layers keep their own names: a model's state dict holds ``….q_proj.U`` and so on for every layer
(:class:`~masm.method.MASMLinear` writes and reads its row), and the group's own tensors are not in it.
"""

from __future__ import annotations

import torch
from torch import nn

from .operands import group_operands, operand_dtype

#: The tensors a group stores per layer, in the order a layer's state dict lists them.
LAYER_TENSORS = ("weight_sem", "bias", "U", "s", "V", "sigma0", "energy0", "energy_sem", "U_basis", "V_basis")
FACTORS = ("U", "s", "V")


class LayerGroup(nn.Module):
    """The tensors of same-shape MASM layers (same d_out, d_in, K, m, guard and bias), stacked.

    ``layout`` holds what must be equal across the group: shapes, K, m, the guard mode and rank, which
    side stores the complement of its guarded basis, and whether the layers have a bias.
    """

    def __init__(self, tensors: dict[str, torch.Tensor | None], layout: dict):
        super().__init__()
        self.layout = dict(layout)
        for name in LAYER_TENSORS:
            value = tensors.get(name)
            if name in FACTORS:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @classmethod
    def stack(cls, groups: list[LayerGroup]) -> LayerGroup:
        """One group holding the rows of ``groups`` (of equal layout) in order."""
        layout = groups[0].layout
        tensors = {}
        for name in LAYER_TENSORS:
            parts = [getattr(g, name) for g in groups]
            tensors[name] = None if parts[0] is None else torch.cat([p.detach() for p in parts])
        return cls(tensors, layout)

    def __len__(self) -> int:
        return self.U.shape[0]

    # -- the operands, built once per forward pass of the model -------------------------------------------
    def begin_pass(self) -> None:
        """Build every layer's operands for the model's forward that starts now (called by the hook
        :func:`~masm.method.apply_masm` puts on the model). Built in one go for the group, from the current
        factors; kept only until the forward ends, so no later forward can see stale ones."""
        track = torch.is_grad_enabled() and self.U.requires_grad
        dtype = operand_dtype(self)
        out = self.reusable_operands(dtype)
        with torch.autocast(self.U.device.type, enabled=False):
            self._pass, self._operands = group_operands(
                self.U, self.s, self.V, self.weight_sem, self.bias, dtype, track, out
            )

    def end_pass(self) -> None:
        self._pass = None

    def reusable_operands(self, dtype: torch.dtype) -> tuple | None:
        """The previous pass's operand storage, when nothing else holds it any more (its backward has run,
        or it had none), to be written again: a fresh allocation of that size is a fresh mapping on the CPU,
        whose page faults cost twice the build (ViT-B/16: 50 against 23 ms). ``None``: allocate anew (a
        forward still awaits its backward, another dtype or device, an inference tensor outside inference
        mode, or under ``torch.compile``, which allocates for itself)."""
        held = self.__dict__.get("_operands")
        if held is None or torch.compiler.is_compiling() or not hasattr(torch._C, "_storage_Use_Count"):
            return None
        weights = held[0]
        if weights.dtype != dtype or weights.device != self.U.device:
            return None
        if weights.is_inference() and not torch.is_inference_mode_enabled():
            return None
        # our reference and the temporary storage object: 2; a saved view of a pending backward adds one
        if any(t is not None and torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2 for t in held):
            return None
        return held

    def pass_arguments(self, index: int) -> tuple | None:
        """Layer ``index``'s operands of the current forward pass (``None`` outside one)."""
        built = self.__dict__.get("_pass")
        return None if built is None else built[index]

    def operands_of(self, index: int, dtype: torch.dtype) -> tuple:
        """Layer ``index``'s operands built for it alone (a layer called outside its model's forward)."""
        rows = slice(index, index + 1)
        tensors = [t if len(self) == 1 else t[rows] for t in (self.U, self.s, self.V, self.weight_sem)]
        bias = None if self.bias is None else (self.bias if len(self) == 1 else self.bias[rows])
        track = torch.is_grad_enabled() and self.U.requires_grad
        with torch.autocast(self.U.device.type, enabled=False):
            return group_operands(*tensors, bias, dtype, track)[0][0]

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: the kept operand storage is dropped
        self._operands = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # a copy (deepcopy, pickle) holds no operands of a forward in flight
        return {**self.__dict__, "_pass": None, "_operands": None}

    # -- what the layout says -----------------------------------------------------------------------------
    @property
    def num_subspaces(self) -> int:
        return self.layout["num_subspaces"]

    @property
    def subspace_rank(self) -> int:
        return self.layout["subspace_rank"]

    @property
    def semantic_guard(self) -> str:
        return self.layout["semantic_guard"]

    @property
    def guarded(self) -> bool:
        return self.semantic_guard == "project"

    # -- state dicts: the layers hold the keys ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # every row is saved under its layer's name

    def _load_from_state_dict(self, state_dict, prefix, metadata, strict, missing, unexpected, errors):
        pass  # every row is loaded by its layer

    # -- the semantic guard (method.md §3), batched over the group -------------------------------------------
    @torch.no_grad()
    def project_gradients_(self) -> None:
        """``U``/``V`` gradients projected out of the guarded directions (``project`` mode; else a no-op).

        Called between backward and the optimizer step, so Adam's moments only ever see the complement.
        """
        if self.guarded:
            self._project_(self.U.grad, self.V.grad)

    @torch.no_grad()
    def reproject_(self, skip: torch.Tensor | None = None) -> None:
        """The stored ``U``/``V`` projected out of the guarded directions (``project`` mode; else a no-op).

        Called after every optimizer step: Adam's per-element scaling and weight decay move the stored
        tensors out of the complement even though their gradients lie in it. (Paused subspaces are put
        back bit for bit afterwards by the mask.) ``skip``: a device flag; where set, nothing changes (the
        step was refused).
        """
        if self.guarded:
            self._project_(self.U, self.V, skip)

    def _project_(self, u: torch.Tensor | None, v: torch.Tensor | None, skip=None) -> None:
        for tensor, basis, complement in (
            (u, self.U_basis, self.layout["u_complement"]),
            (v, self.V_basis, self.layout["v_complement"]),
        ):
            if tensor is None:
                continue
            inside = torch.bmm(basis, torch.bmm(basis.mT, tensor))  # bmm: no broadcasting views
            if skip is not None:
                tensor.copy_(torch.where(skip, tensor, inside if complement else tensor - inside))
            elif complement:
                tensor.copy_(inside)
            else:
                tensor.sub_(inside)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"layers={len(self)}, out_features={lay['out_features']}, in_features={lay['in_features']}, "
            f"K={lay['num_subspaces']}, m={lay['subspace_rank']}, semantic_guard={lay['semantic_guard']}"
        )

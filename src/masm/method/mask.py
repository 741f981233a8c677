"""Selective layer mask (method.md §4): which artifact subspaces may update, from their learning state.

The learning state of subspace k of layer l is the gradient signal-to-noise ratio of its parameters
``(U_k, s_k, V_k)``: with bias-corrected EMAs ``μ`` of the gradient and ``ν`` of its square,
``B = ‖μ‖²``, ``Var = Σ(ν − μ²)`` and ``ρ = B / (B + Var + ε)`` ∈ [0, 1]. Every ``interval`` steps after
``warmup`` the mask is recomputed and held:

* layer selection: layers whose mean ρ is outside the top ``top_fraction`` are frozen (no consistent
  forgery signal; updating them only disturbs pretrained structure);
* subspace balance: in a selected layer, a subspace whose share of the layer's ρ exceeds ``(1+δ)/K`` is
  paused, so the others learn complementary artifacts; at least one subspace per selected layer stays on.

A paused subspace keeps its values and its optimizer moments through the step. The factors of a group of
same-shape layers are one tensor each (:class:`~masm.method.LayerGroup`), so pausing happens around the
optimizer step, on whole group tensors and on the device: the paused columns' gradients are zeroed, and the
factors and the optimizer's moments are copied before the step and put back in the paused columns after it
(zeroing alone is not enough: Adam's momentum and weight decay would move them). That needs an element-wise
optimizer (Adam, AdamW, SGD); any other is refused. The optimizer's step count is shared by a group's
subspaces and so moves on for paused ones too.

Nothing here waits for the device in a step: the mask is a device tensor, computed on the device every
``interval`` steps, and applied by a fixed number of multi-tensor operations whatever it holds. Only the
mask's log (``masks.jsonl``) reads it on the host, on the steps it is recomputed. The controller reads
gradients that DDP has already averaged, so every rank computes the same mask; it is broadcast from rank 0
all the same, as a guard against round-off.

Usage in a training step (:func:`masm.method.subspace_update` does the same, with the semantic guard)::

    loss.backward()
    controller.step(optimizer)  # observe gradients, maybe recompute the mask, set paused subspaces aside
    optimizer.step()
    controller.restore()        # paused subspaces: values and moments as they were before the step
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .apply import masm_layers
from .config import MaskConfig
from .layer import layer_groups

#: Optimizers whose update is element-wise, so that putting paused entries back undoes it exactly.
ELEMENTWISE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class SelectiveMaskController:
    def __init__(self, model: nn.Module, config: MaskConfig, log_path: str | Path | None = None):
        self.config = config
        self.layers = masm_layers(model)
        if not self.layers:
            raise ValueError("the model has no MASM layers to mask")
        self.groups = layer_groups([layer for _, layer in self.layers])
        self.num_subspaces = self.layers[0][1].num_subspaces
        L, K = len(self.layers), self.num_subspaces
        device = self.groups[0].U.device
        # Row of each layer (model order) in the groups' rows laid end to end, and back.
        offsets, start = {}, 0
        for group in self.groups:
            offsets[id(group)] = start
            start += len(group)
        self._where = [(self.groups.index(layer.group), layer.index) for _, layer in self.layers]
        order = [offsets[id(layer.group)] + layer.index for _, layer in self.layers]
        self._to_model_order = torch.tensor(order, device=device)
        self._to_group_order = torch.empty_like(self._to_model_order)
        self._to_group_order[self._to_model_order] = torch.arange(L, device=device)
        # EMAs of the gradient and its square, one tensor per factor of each group, in (group, U/s/V) order,
        # so a step updates all of them with a handful of fused multi-tensor ops.
        self._params = [getattr(g, name) for g in self.groups for name in ("U", "s", "V")]
        self._mu = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self._nu = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self._observed = torch.zeros((), dtype=torch.float64, device=device)  # for bias correction
        self.num_steps = 0  # calls to step()
        self.rho = torch.zeros(L, K, device=device)
        self.mask = torch.ones(L, K, dtype=torch.bool, device=device)
        self.log_path = Path(log_path) if log_path else None
        self._masking = False  # whether a mask was computed (before that, everything learns)
        self._columns: list[torch.Tensor] = []  # per factor tensor: 1 where its column learns, else 0
        self._saved: list[torch.Tensor] = []
        self._paused: list[torch.Tensor] = []  # 1 - _columns
        self._held: list[torch.Tensor] = []  # factors and moments that _saved copies
        self._held_columns: list[tuple[torch.Tensor, torch.Tensor]] = []  # (learns, paused) per held tensor

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def masking(self) -> bool:
        """Whether a mask was set: from then on every step pauses what it holds."""
        return self._masking

    @property
    def num_observed(self) -> int:
        return int(self._observed)

    # -- the three phases of a step ------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, skip: torch.Tensor | None = None) -> None:
        """Update the gradient EMAs from the current ``.grad`` of every factor (missing grad = 0).

        ``skip``: a device flag; where it is set the EMAs stay as they were (a refused step's gradients
        never reach them), decided on the device.
        """
        beta = self.config.beta
        grads = [
            p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for p in self._params
        ]
        if skip is None:
            torch._foreach_mul_(self._mu, beta)
            torch._foreach_add_(self._mu, grads, alpha=1 - beta)
            torch._foreach_mul_(self._nu, beta)
            torch._foreach_addcmul_(self._nu, grads, grads, value=1 - beta)
            self._observed += 1
            return
        mu = torch._foreach_add(torch._foreach_mul(self._mu, beta), grads, alpha=1 - beta)
        nu = torch._foreach_addcmul(torch._foreach_mul(self._nu, beta), grads, grads, value=1 - beta)
        for held, new in zip(self._mu + self._nu, mu + nu):
            held.copy_(torch.where(skip, held, new))
        self._observed += (~skip).double()

    @torch.no_grad()
    def learning_state(self) -> torch.Tensor:
        """ρ of every (layer, subspace) from the bias-corrected EMAs, as an L×K tensor on the device, layers
        in model order."""
        K = self.num_subspaces
        correction = (1 - torch.pow(self.config.beta, self._observed)).clamp_min(1e-300)
        mu = torch._foreach_div([t.double() for t in self._mu], correction)
        nu = torch._foreach_div([t.double() for t in self._nu], correction)
        mu_sq = torch._foreach_mul(mu, mu)
        spread = torch._foreach_sub(nu, mu_sq)
        torch._foreach_clamp_min_(spread, 0.0)

        def per_subspace(tensors):  # L × K: each layer's U, s, V columns summed, then grouped by subspace
            rows = []
            for i, group in enumerate(self.groups):
                u, s, v = tensors[3 * i : 3 * i + 3]
                columns = u.sum(1) + s + v.sum(1)  # layers × Km
                rows.append(columns.view(len(group), K, -1).sum(-1))
            return torch.cat(rows)[self._to_model_order]

        bias, var = per_subspace(mu_sq), per_subspace(spread)
        rho = (bias / (bias + var + self.config.eps)).float()
        return torch.where(self._observed > 0, rho, torch.zeros_like(rho))

    def compute_mask(self, rho: torch.Tensor) -> torch.Tensor:
        """Apply layer selection and subspace balance to ``rho`` (L×K); returns a boolean L×K mask on
        ``rho``'s device, computed there."""
        cfg = self.config
        L, K = rho.shape
        mask = torch.ones(L, K, dtype=torch.bool, device=rho.device)
        if cfg.layer_selection:
            keep = max(1, math.ceil(cfg.top_fraction * L))
            # Stable sort: ties keep layer order, so the choice is deterministic on every rank.
            order = torch.sort(-rho.mean(1), stable=True).indices
            mask[order[keep:]] = False
        if cfg.subspace_balance and K > 1:
            limit = (1 + cfg.delta) / K
            total = rho.sum(1)
            share = rho / total.unsqueeze(1)
            paused = share > limit
            # only possible with δ < 0: keep the least dominant one learning
            keep_one = nn.functional.one_hot(share.argmin(1), K).bool() & paused.all(1, keepdim=True)
            paused &= ~keep_one
            applies = mask.any(1, keepdim=True) & (total > 0).unsqueeze(1)
            mask &= ~(paused & applies)
        return mask

    def update_due(self) -> bool:
        """Whether the mask is recomputed at the current step (warm-up over, at an interval boundary)."""
        past_warmup = self.num_steps - self.config.warmup
        return past_warmup >= 0 and past_warmup % self.config.interval == 0

    def set_mask(self, mask: torch.Tensor) -> None:
        """Hold ``mask`` (L×K, True = learns; on the device) from now on, as if the controller had computed
        it, and derive per factor tensor which of its columns learn (as 0/1 factors)."""
        self.mask = mask
        in_groups = mask[self._to_group_order]
        columns_now = []
        start = 0
        for group in self.groups:
            rows = in_groups[start : start + len(group)]
            start += len(group)
            columns = rows.repeat_interleave(group.subspace_rank, dim=1)  # layers × Km
            for name in ("U", "s", "V"):
                active = columns if name == "s" else columns.unsqueeze(1)
                columns_now.append(active.to(getattr(group, name).dtype))
        paused_now = [1 - active for active in columns_now]
        if self._masking:  # written in place: a step captured as a CUDA graph reads these very tensors
            torch._foreach_copy_(self._columns + self._paused, columns_now + paused_now)
        else:
            self._columns, self._paused = columns_now, paused_now
        self._masking = True

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Set the paused subspaces aside for the coming optimizer step (:meth:`restore` undoes it after):
        their gradients are zeroed (so neither clipping nor the optimizer sees them), and the factors and
        ``optimizer``'s moments (every state tensor shaped like its parameter) are copied."""
        self._saved = []
        if not (self.config.enabled and self._masking):
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        masks = [m for p, m in zip(self._params, self._columns) if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, masks)
        if optimizer is None:
            raise ValueError(
                "the mask pauses subspaces inside the layers' shared tensors: pass the optimizer to "
                "SelectiveMaskController.step(), so that the paused ones keep their optimizer moments"
            )
        held, columns = [], []
        for p, active, paused in zip(self._params, self._columns, self._paused):
            state = optimizer.state.get(p, {})
            for tensor in (p, *(t for t in state.values() if torch.is_tensor(t) and t.shape == p.shape)):
                held.append(tensor)
                columns.append((active, paused))
        self._held, self._held_columns = held, columns
        self._saved = torch._foreach_mul(held, 1.0)

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step: the paused columns' values and moments as :meth:`apply` saved them,
        bit for bit (``new · 1 + saved · 0`` where a column learns, ``new · 0 + saved · 1`` where not)."""
        if not self._saved:
            return
        torch._foreach_mul_(self._held, [active for active, _ in self._held_columns])
        torch._foreach_addcmul_(self._held, self._saved, [paused for _, paused in self._held_columns])
        self._saved, self._held, self._held_columns = [], [], []

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if (
            self.config.enabled
            and optimizer is not None
            and not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)
        ):
            raise ConfigError(
                f"the selective mask cannot pause subspaces under {type(optimizer).__name__}: it puts paused "
                "entries back after each step, which undoes only an element-wise update (Adam, AdamW, SGD); "
                "use optim.name adam or adamw, or set model.method.masm.mask.enabled: false"
            )

    def step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        skip: torch.Tensor | None = None,
        advance: bool = True,
    ) -> None:
        """Observe gradients, recompute the mask when due, and set the paused subspaces aside.

        Call :meth:`restore` after ``optimizer.step()``. ``optimizer`` is needed once the mask pauses
        anything (the paused entries keep their moments). ``skip``: see :meth:`observe`. ``advance=False``:
        the device work of a step at which no recompute is due, and nothing else, for a step captured as a
        CUDA graph: its replays do not run this Python, so the caller counts them (:meth:`advance`).
        """
        self.check_optimizer(optimizer)
        self.observe(skip)
        if self.config.enabled and self.update_due():
            if not advance:
                raise RuntimeError("the mask is due for a recompute at this step: call step() with advance")
            rho = self.learning_state()
            mask = _broadcast(self.compute_mask(rho))
            if skip is not None:  # a refused step leaves the mask as it was, too
                rho, mask = torch.where(skip, self.rho, rho), torch.where(skip, self.mask, mask)
            self.rho = rho
            self.set_mask(mask)
            self._log()
        if advance:
            self.advance()
        if self.config.enabled:
            self.apply(optimizer)

    def advance(self) -> None:
        """Count a step whose device work ran without :meth:`step`'s Python (a CUDA graph's replay)."""
        self.num_steps += 1

    # -- persistence ---------------------------------------------------------------------------------------
    def _layer_moments(self, i: int, moments: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer i's rows of ``moments`` (its U, s and V)."""
        g, row = self._where[i]
        return [t[row] for t in moments[3 * g : 3 * g + 3]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly) of everything needed to resume bit-for-bit."""
        state = {
            "num_observed": self._observed.round().long().cpu(),
            "num_steps": torch.tensor(self.num_steps),
            "rho": self.rho.cpu().clone(),
            "mask": self.mask.to(torch.uint8).cpu(),
        }
        for i, (_, layer) in enumerate(self.layers):
            for k in range(self.num_subspaces):
                cols = layer.subspace_columns(k)
                for key, moments in (("mu", self._mu), ("nu", self._nu)):
                    parts = self._layer_moments(i, moments)
                    state[f"{key}.{i}.{k}"] = torch.cat([t[..., cols].reshape(-1) for t in parts]).cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        L, K = len(self.layers), self.num_subspaces
        if tuple(state["mask"].shape) != (L, K):
            raise ValueError(f"mask state has shape {tuple(state['mask'].shape)}, model needs {(L, K)}")
        device = self._observed.device
        self._observed.fill_(int(state["num_observed"]))
        self.num_steps = int(state["num_steps"])
        self.rho = state["rho"].float().to(device).clone()
        mask = state["mask"].bool().to(device).clone()
        if self.config.enabled and self.num_steps > self.config.warmup:
            self.set_mask(mask)
        else:
            self.mask = mask
        with torch.no_grad():
            for i, (_, layer) in enumerate(self.layers):
                for k in range(K):
                    cols = layer.subspace_columns(k)
                    for moments, key in ((self._mu, "mu"), (self._nu, "nu")):
                        flat = state[f"{key}.{i}.{k}"]
                        offset = 0
                        for t in self._layer_moments(i, moments):
                            part = t[..., cols]
                            part.copy_(flat[offset : offset + part.numel()].view_as(part))
                            offset += part.numel()

    def _log(self) -> None:
        if self.log_path is None or not _is_main_process():
            return
        record = {
            "step": self.num_steps,
            "layers": self.layer_names,
            "rho": [[round(float(v), 6) for v in row] for row in self.rho.cpu()],
            "mask": [[int(v) for v in row] for row in self.mask.cpu()],
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _broadcast(mask: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return mask
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = mask.to(device=device, dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.to(mask.device).bool()

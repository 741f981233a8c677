"""Selective layer mask (method.md §4): which artifact subspaces may update, from their learning state.

The learning state of subspace k of layer l is the gradient signal-to-noise ratio of its parameters
``(U_k, s_k, V_k)``: with bias-corrected EMAs ``μ`` of the gradient and ``ν`` of its square,
``B = ‖μ‖²``, ``Var = Σ(ν − μ²)`` and ``ρ = B / (B + Var + ε)`` ∈ [0, 1]. Every ``interval`` steps after
``warmup`` the mask is recomputed and held:

* layer selection: layers whose mean ρ is outside the top ``top_fraction`` are frozen (no consistent
  forgery signal; updating them only disturbs pretrained structure);
* subspace balance: in a selected layer, a subspace whose share of the layer's ρ exceeds ``(1+δ)/K`` is
  paused, so the others learn complementary artifacts; at least one subspace per selected layer stays on.

A paused subspace keeps its values and its optimizer moments through the step. A layer's K subspaces are
columns of one tensor per factor (:class:`~masm.method.MASMLinear`), so pausing happens around the
optimizer step: a layer paused whole gets ``grad = None`` (the optimizer skips it); in a partly paused
layer the paused columns' gradients are zeroed and their values and moments are saved before the step
and written back after it (zeroing alone is not enough: Adam's momentum and weight decay would move them).
The optimizer's step count of a partly paused layer is shared by its subspaces and so moves on. The
controller only reads gradients that DDP has already averaged, so every rank computes the same mask; it
is broadcast from rank 0 all the same, as a guard against round-off.

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

from .apply import masm_layers
from .config import MaskConfig


class SelectiveMaskController:
    def __init__(self, model: nn.Module, config: MaskConfig, log_path: str | Path | None = None):
        self.config = config
        self.layers = masm_layers(model)
        if not self.layers:
            raise ValueError("the model has no MASM layers to mask")
        self.num_subspaces = self.layers[0][1].num_subspaces
        L, K = len(self.layers), self.num_subspaces
        # EMAs of the gradient and its square, one tensor per factor, in (layer, U/s/V) order, so a step
        # updates all of them with a handful of fused multi-tensor ops.
        self._params = [p for _, layer in self.layers for p in (layer.U, layer.s, layer.V)]
        self._mu = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self._nu = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self.num_observed = 0  # steps whose gradients were observed (for bias correction)
        self.num_steps = 0  # calls to step()
        self.rho = torch.zeros(L, K)
        self.mask = torch.ones(L, K, dtype=torch.bool)
        self.log_path = Path(log_path) if log_path else None
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (tensor, columns, values)
        self._plan_for: torch.Tensor | None = None  # the mask that _plan was computed for
        self._plan: list[tuple[nn.Module, torch.Tensor | None]] = []

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    # -- the three phases of a step ------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self) -> None:
        """Update the gradient EMAs from the current ``.grad`` of every subspace (missing grad = 0)."""
        beta = self.config.beta
        self.num_observed += 1
        grads = [
            p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for p in self._params
        ]
        torch._foreach_mul_(self._mu, beta)
        torch._foreach_add_(self._mu, grads, alpha=1 - beta)
        torch._foreach_mul_(self._nu, beta)
        torch._foreach_addcmul_(self._nu, grads, grads, value=1 - beta)

    def _subspace_moments(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened (μ, ν) of subspace k of layer i (its U_k, s_k and V_k concatenated)."""
        cols = self.layers[i][1].subspace_columns(k)
        mu = torch.cat([t[..., cols].reshape(-1) for t in self._mu[3 * i : 3 * i + 3]])
        nu = torch.cat([t[..., cols].reshape(-1) for t in self._nu[3 * i : 3 * i + 3]])
        return mu, nu

    @torch.no_grad()
    def learning_state(self) -> torch.Tensor:
        """ρ of every (layer, subspace) from the bias-corrected EMAs, as an L×K CPU tensor."""
        L, K = len(self.layers), self.num_subspaces
        if self.num_observed == 0:
            return torch.zeros(L, K)
        correction = 1 - self.config.beta**self.num_observed
        # Multi-tensor ops over every factor, per-column sums, one device-to-host copy at the end: no
        # per-subspace scalar is written to the host (384 syncs per update on ViT-L/14 otherwise).
        mu = torch._foreach_div([t.double() for t in self._mu], correction)
        nu = torch._foreach_div([t.double() for t in self._nu], correction)
        mu_sq = torch._foreach_mul(mu, mu)
        spread = torch._foreach_sub(nu, mu_sq)
        torch._foreach_clamp_min_(spread, 0.0)

        def per_subspace(tensors):  # L × K: each layer's U, s, V columns summed, then grouped by subspace
            columns = [t.reshape(-1, t.shape[-1]).sum(0) for t in tensors]
            return torch.stack([sum(columns[3 * i : 3 * i + 3]) for i in range(L)]).view(L, K, -1).sum(-1)

        bias, var = per_subspace(mu_sq), per_subspace(spread)
        return (bias / (bias + var + self.config.eps)).float().cpu()

    def compute_mask(self, rho: torch.Tensor) -> torch.Tensor:
        """Apply layer selection and subspace balance to ``rho`` (L×K); returns a boolean L×K mask."""
        cfg = self.config
        L, K = rho.shape
        mask = torch.ones(L, K, dtype=torch.bool)
        if cfg.layer_selection:
            keep = max(1, math.ceil(cfg.top_fraction * L))
            # Stable sort: ties keep layer order, so the choice is deterministic on every rank.
            order = sorted(range(L), key=lambda i: -float(rho[i].mean()))
            for i in order[keep:]:
                mask[i] = False
        if cfg.subspace_balance and K > 1:
            limit = (1 + cfg.delta) / K
            for i in range(L):
                total = float(rho[i].sum())
                if not mask[i].any() or total <= 0:
                    continue
                share = rho[i] / total
                paused = share > limit
                if paused.all():  # only possible with δ < 0: keep the least dominant one learning
                    paused[int(share.argmin())] = False
                mask[i] &= ~paused
        return mask

    def update_due(self) -> bool:
        """Whether the mask is recomputed at the current step (warm-up over, at an interval boundary)."""
        past_warmup = self.num_steps - self.config.warmup
        return past_warmup >= 0 and past_warmup % self.config.interval == 0

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Set the paused subspaces aside for the coming optimizer step (:meth:`restore` undoes it after).

        A layer paused whole loses its gradients (``grad = None``: the optimizer skips it). In a partly
        paused layer the paused columns' gradients are zeroed and their values and ``optimizer``'s moments
        (every state tensor shaped like the parameter) are saved.
        """
        self._saved = []
        for layer, paused in self._pause_plan():
            factors = (layer.U, layer.s, layer.V)
            if paused is None:
                for p in factors:
                    p.grad = None
                continue
            if optimizer is None:
                raise ValueError(
                    "some subspaces of a layer are paused and others are not: pass the optimizer to "
                    "SelectiveMaskController.step(), so that the paused ones keep their optimizer moments"
                )
            for p in factors:
                if p.grad is not None:
                    p.grad.index_fill_(-1, paused, 0)
                state = optimizer.state.get(p, {})
                for tensor in [p, *(t for t in state.values() if torch.is_tensor(t) and t.shape == p.shape)]:
                    self._saved.append((tensor, paused, tensor.index_select(-1, paused)))

    def _pause_plan(self) -> list[tuple[nn.Module, torch.Tensor | None]]:
        """``(layer, paused columns on its device)`` of every layer with a paused subspace, ``None`` for a
        layer paused whole; recomputed only when the mask changed (every ``interval`` steps), so a step
        neither inspects the mask layer by layer nor copies indices to the device."""
        if self._plan_for is None or not torch.equal(self._plan_for, self.mask):
            plan = []
            for i, (_, layer) in enumerate(self.layers):
                active = self.mask[i]
                if bool(active.all()):
                    continue
                if not bool(active.any()):
                    plan.append((layer, None))
                    continue
                m = layer.subspace_rank
                paused = torch.arange(layer.num_subspaces * m).view(-1, m)[~active].reshape(-1)
                plan.append((layer, paused.to(layer.U.device)))
            self._plan, self._plan_for = plan, self.mask.clone()
        return self._plan

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step: the paused columns' values and moments as :meth:`apply` saved them."""
        for tensor, columns, values in self._saved:
            tensor.index_copy_(-1, columns, values)
        self._saved = []

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Observe gradients, recompute the mask when due, and set the paused subspaces aside.

        Call :meth:`restore` after ``optimizer.step()``. ``optimizer`` is needed as soon as a layer is
        only partly paused (its moments are kept through the step).
        """
        self.observe()
        if self.config.enabled and self.update_due():
            self.rho = self.learning_state()
            self.mask = _broadcast(self.compute_mask(self.rho))
            self._log()
        self.num_steps += 1
        if self.config.enabled:
            self.apply(optimizer)

    # -- persistence ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly) of everything needed to resume bit-for-bit."""
        state = {
            "num_observed": torch.tensor(self.num_observed),
            "num_steps": torch.tensor(self.num_steps),
            "rho": self.rho.clone(),
            "mask": self.mask.to(torch.uint8),
        }
        for i in range(len(self.layers)):
            for k in range(self.num_subspaces):
                mu, nu = self._subspace_moments(i, k)
                state[f"mu.{i}.{k}"] = mu.cpu()
                state[f"nu.{i}.{k}"] = nu.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        L, K = len(self.layers), self.num_subspaces
        if tuple(state["mask"].shape) != (L, K):
            raise ValueError(f"mask state has shape {tuple(state['mask'].shape)}, model needs {(L, K)}")
        self.num_observed = int(state["num_observed"])
        self.num_steps = int(state["num_steps"])
        self.rho = state["rho"].float().clone()
        self.mask = state["mask"].bool().clone()
        for i, (_, layer) in enumerate(self.layers):
            for k in range(K):
                cols = layer.subspace_columns(k)
                for moments, key in ((self._mu, "mu"), (self._nu, "nu")):
                    flat = state[f"{key}.{i}.{k}"]
                    offset = 0
                    for t in moments[3 * i : 3 * i + 3]:
                        part = t[..., cols]
                        t[..., cols] = flat[offset : offset + part.numel()].view_as(part).to(t)
                        offset += part.numel()

    def _log(self) -> None:
        if self.log_path is None or not _is_main_process():
            return
        record = {
            "step": self.num_steps,
            "layers": self.layer_names,
            "rho": [[round(float(v), 6) for v in row] for row in self.rho],
            "mask": [[int(v) for v in row] for row in self.mask],
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
    return buf.cpu().bool()

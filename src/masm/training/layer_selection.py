"""FMSD's forgery-aware layer selection: which targeted layers a run decomposes and adapts.

Before the detector with adapters is built, ``select.steps`` training batches score every targeted Linear
by the signal-to-noise ratio of its weight gradient, the learning state of the selective mask
(method.md §4) on the full weight ``W_l`` instead of a subspace's factors. With ``g_t`` the weight gradient
of batch ``t`` (averaged over the global batch, as DDP averages it) and running means over the ``T``
batches, ``μ = mean_t g_t`` and ``ν = mean_t g_t²``:

    ``B = ‖μ‖²``,  ``Var = Σ(ν − μ²) = mean_t ‖g_t‖² − ‖μ‖²``,  ``ρ_l = B / (B + Var + ε)``.

The second form of ``Var`` is exact, so per layer only the running sum of ``g_t`` (one tensor) and of
``‖g_t‖²`` (one number) are kept. Running means, not the mask's EMA: the phase is short and has a fixed
length, so every batch counts alike. The pretrained weights do not move during the phase; the head does
(a linear probe with the run's optimizer settings), so that the gradients are those of a head that
separates the classes rather than of its random initialisation. The top ``ceil(fraction · L)`` layers
(ties: the earlier layer) become ``select.layers``, which the model config then carries: a checkpoint
rebuilds its detector, and a resumed run continues, without selecting again.

The phase reads its own pass over the training set (its seed derived from the run's), and the RNGs are
reseeded afterwards, so the training phase is exactly that of a run given these layers from the start.
Under DDP every rank adds its share of a batch and the sums are all-reduced, so the scores are the same
on every rank; rank 0's are broadcast all the same, so that round-off cannot split the choice.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.sampling import derive_seed
from ..errors import DataError
from ..method import find_targets, total_loss
from ..method.config import SelectConfig
from ..models.factory import create_detector
from ..precision import autocast_for
from . import distributed as dist_utils
from .config import TrainConfig
from .data import build_train_loader
from .optim import optimizer_for
from .state import seed_everything

logger = logging.getLogger(__name__)

PLOT_FILE = "select.png"


class GradientMoments:
    """Running sums of each layer's gradient and of its squared norm, and the learning state from them."""

    def __init__(self, shapes: list[torch.Size], device: torch.device | str = "cpu"):
        self.sums = [torch.zeros(shape, dtype=torch.float32, device=device) for shape in shapes]
        self.square_norms = torch.zeros(len(shapes), dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, grads: list[torch.Tensor]) -> None:
        """One batch's gradients, one per layer, in the order of the shapes."""
        grads = [g.float() for g in grads]
        torch._foreach_add_(self.sums, grads)
        self.square_norms += torch.stack([g.double().pow(2).sum() for g in grads])
        self.count += 1

    @torch.no_grad()
    def learning_state(self, eps: float = 1e-12) -> torch.Tensor:
        """ρ of every layer (float64, CPU): ``B / (B + Var + ε)`` from the running means."""
        if self.count < 2:
            raise ValueError("the learning state needs the gradients of at least two batches")
        bias = torch.stack([s.double().pow(2).sum() for s in self.sums]) / self.count**2
        variance = (self.square_norms / self.count - bias).clamp_min(0.0)
        return (bias / (bias + variance + eps)).cpu()


def top_layers(names: list[str], scores: torch.Tensor, fraction: float) -> list[str]:
    """The ``ceil(fraction · L)`` best-scoring names (at least one), in model order; ties keep layer order."""
    keep = max(1, math.ceil(fraction * len(names)))
    order = sorted(range(len(names)), key=lambda i: -float(scores[i]))  # stable: ties keep layer order
    chosen = set(order[:keep])
    return [name for i, name in enumerate(names) if i in chosen]


@dataclass
class LayerSelection:
    layers: list[str]  # the chosen layers, in model order
    names: list[str]  # every targeted layer, in model order
    scores: list[float]  # ρ of each targeted layer
    steps: int  # batches that entered the scores

    def record(self, select: SelectConfig) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the selection."""
        return {
            "kind": "select",
            "step": 0,
            "steps": self.steps,
            "fraction": select.fraction,
            "layers": self.names,
            "scores": [round(s, 6) for s in self.scores],
            "selected": self.layers,
        }


def needs_selection(config: TrainConfig) -> bool:
    masm = config.model.method.masm_config
    return masm is not None and masm.select.enabled and masm.select.layers is None


def select_layers(
    config: TrainConfig, records, env: dist_utils.DistEnv, log: Callable[[dict], None], out: Path | None
) -> LayerSelection:
    """Score the targeted layers on ``select.steps`` batches of ``records``, write the chosen ones to
    ``config.model.method.masm.select.layers``, log and draw the scores; the RNGs are reseeded after."""
    select = config.model.method.masm.select
    with dist_utils.local_main_first(env):  # one download of the backbone per machine
        probe = create_detector(
            config.model.backbone,
            _probe_method(config),
            preprocessing=config.model.preprocessing,
            seed=config.seed,  # the head the run starts from
            head_logits=config.model.head_logits,
        )
    names, scores, steps = _measure(probe, config, records, env)
    del probe
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    scores = dist_utils.broadcast_object(env, scores)
    selection = LayerSelection(top_layers(names, torch.tensor(scores), select.fraction), names, scores, steps)
    select.layers = selection.layers
    log(selection.record(select))
    if env.is_main and out is not None:
        plot_selection(selection, out / PLOT_FILE)
    logger.info(
        "layer selection: kept %d of %d layers (fraction %g) after %d batches",
        len(selection.layers),
        len(names),
        select.fraction,
        steps,
    )
    seed_everything(config.seed)
    return selection


def _probe_method(config: TrainConfig):
    """The run's method as a head-only model (``linear``): the targets' weights stay plain Linears."""
    method = copy.deepcopy(config.model.method)
    method.adapter = "linear"
    return method


def _measure(probe, config: TrainConfig, records, env) -> tuple[list[str], list[float], int]:
    """``(names, ρ per layer, batches used)``: the head trains, the targets' weight gradients are summed."""
    select = config.model.method.masm.select
    probe.to(env.device).train()
    targets = find_targets(probe.backbone, probe.config.method.masm.target_modules)
    weights = [linear.weight for _, linear in targets]
    for weight in weights:
        weight.requires_grad_(True)
    head = list(probe.head.parameters())
    optimizer = optimizer_for(config, head)
    moments = GradientMoments([w.shape for w in weights], env.device)
    own = copy.deepcopy(config)
    own.seed = derive_seed(config.seed, "layer-selection") % 2**31  # its own order, not the training one's
    plan = build_train_loader(own, records, probe.preprocessing, env.rank, env.world_size, env.device)
    epoch = 0
    while moments.count < select.steps:
        if epoch > 0 and moments.count == 0:  # a whole pass without one loaded sample would never end
            raise DataError("layer selection: no training sample loaded in a whole pass over the data")
        plan.start_epoch(epoch, own.seed, 0)
        for batch in plan.loader:
            _batch_gradients(probe, batch, weights + head, config, env)
            if probe.head.weight.grad is None:  # no rank had a sample: nothing to learn from
                continue
            moments.add([w.grad for w in weights])
            optimizer.step()
            if moments.count == select.steps:
                break
        epoch += 1
    return [name for name, _ in targets], moments.learning_state().tolist(), moments.count


def _batch_gradients(probe, batch, params, config: TrainConfig, env) -> None:
    """Gradients of the mean loss over the global batch (every rank's share), in ``.grad`` of ``params``;
    ``.grad`` is None when no rank had a sample."""
    for p in params:
        p.grad = None
    local = 0 if batch["pixel_values"] is None else len(batch["label"])
    if local:
        pixels = batch["pixel_values"].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
        with autocast_for(env.device, config.precision):
            logits = probe(pixels)
        loss, _ = total_loss(logits, labels, probe, None)
        (loss * local).backward()  # a sum over the rank's samples; divided by the global count below
    count = torch.tensor(float(local), device=env.device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if env.distributed:
        torch.distributed.all_reduce(count)
        for g in grads:
            torch.distributed.all_reduce(g)
    total = float(count)
    for p, g in zip(params, grads):
        p.grad = g / total if total else None


def plot_selection(selection: LayerSelection, path: Path) -> Path:
    """A bar per targeted layer: its score ρ, the chosen ones highlighted."""
    from ..evaluation.plots import new_figure, save_figure

    n = len(selection.names)
    fig = new_figure(max(6.0, 0.12 * n + 2), 3.5)
    ax = fig.add_subplot()
    chosen = set(selection.layers)
    colors = ["tab:red" if name in chosen else "tab:gray" for name in selection.names]
    ax.bar(range(n), selection.scores, color=colors)
    ax.set_xticks(range(n))
    ax.set_xticklabels(selection.names, rotation=90, fontsize=max(3, min(7, 600 // max(n, 1))))
    ax.set_ylabel("gradient SNR ρ")
    ax.set_ylim(0, 1)
    ax.set_title(f"layer selection: {len(chosen)} of {n} layers kept (red), {selection.steps} batches")
    return save_figure(fig, path)

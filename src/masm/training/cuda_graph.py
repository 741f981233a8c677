"""The whole training step as one CUDA graph (``cuda_graph: true``).

A steady MASM step is a few thousand small kernels, each launched from Python; on a GPU those launches,
not the arithmetic, bound it. Captured once as a CUDA graph, a step is one launch. The step is written for
that already: it never waits for the device (:mod:`.health`), the mask is a device tensor applied by the
same operations whatever it holds, and every tensor a step keeps is updated in place (the non-finite flag,
the mask's averages and columns, Adam's moments, step count and learning rate, the layers' operand
storage), so a replay reads and writes the tensors that the capture saw.

What one graph cannot hold runs as a normal eager step, with the same arithmetic:

* a batch of another shape than the captured one: frames failed to load (the batch shrank), or the
  epoch's short last batch;
* a step at which the mask is recomputed (every ``interval`` steps; its log reads the host);
* the first :data:`WARMUP` steps of each phase (before the mask is first set, and after), which PyTorch
  asks for before a capture (lazy initialisation, cuBLAS workspaces, Adam's state).

When the mask is first set the step is captured again (it now pauses subspaces); later masks are written
into the same tensors, so the graph needs no further capture. The host keeps its own bookkeeping around
the replay: the learning rate written into its device tensor, the batch copied into the static input, the
mask's step count, the failure ledger, and one small copy of the step's loss terms and gradient norms for
the log and the non-finite check (the graph overwrites its outputs at the next replay).

Under DDP every rank must replay the graph at the same steps: a launch of a graph holding an NCCL
collective is itself a collective (NCCL's rule). The ranks agree before each step, by one vote on the host
(:func:`~.distributed.all_ranks`, gloo: the device's stream is not touched): the graph's step only if every
rank can take it, else an eager step on every rank. The rest is PyTorch's recipe for DDP in a graph: DDP
built on a side stream (:mod:`.trainer`), NCCL's asynchronous error handling off (:func:`~.distributed.setup`),
and :data:`DDP_WARMUP` eager steps before a capture.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..method import total_loss
from ..precision import autocast_for
from . import distributed as dist_utils
from .optim import lr_at, set_lr

if TYPE_CHECKING:
    from .run_state import Run

#: Eager steps of a phase, on a side stream, before its capture (PyTorch's whole-network recipe uses 3).
WARMUP = 3
#: The same under DDP: PyTorch asks for at least 11 DDP-enabled eager iterations before a capture.
DDP_WARMUP = 11


def make_captured_step(run: Run) -> CapturedStep:
    """The captured step of ``run`` (``cuda_graph: true``), or a :class:`ConfigError` naming what is
    missing."""
    if run.env.device.type != "cuda":
        raise ConfigError(f"cuda_graph: true needs a CUDA device; this run is on {run.env.device}")
    return CapturedStep(run, capture=True)


class CapturedStep:
    """The training step of ``run`` as one CUDA graph, and the eager steps around it.

    ``capture=False`` runs the graph's body eagerly at every step instead: the same tensors, in place, and
    the same host bookkeeping, without CUDA; the tests check on the CPU what a capture relies on.
    """

    def __init__(self, run: Run, capture: bool = True):
        self.capture = capture
        self.batch_size = run.plan.per_rank_batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None  # what the graph's replay overwrites: loss terms, gradient norms
        self.grad_names: list[str] = []
        self.phase: bool | None = None  # whether the mask pauses anything; a new phase is captured anew
        self.warm_steps = 0  # eager steps of the body in this phase
        self.pixels: torch.Tensor | None = None  # the static input
        self.labels: torch.Tensor | None = None
        self.kept: list = []  # the operand storage the graph writes, held for as long as it lives
        self.replays = 0
        self.warmup = DDP_WARMUP if run.env.distributed else WARMUP
        self.vote_group = dist_utils.host_group(run.env)

    def takes(self, run: Run, batch: dict) -> bool:
        """Whether this micro-batch's step is the graph's (see the module's docstring): on every rank
        alike under DDP."""
        return dist_utils.all_ranks(run.env, self._fits(run, batch), self.vote_group)

    def _fits(self, run: Run, batch: dict) -> bool:
        pixels = batch["pixel_values"]
        if pixels is None or batch["failed"] or len(pixels) != self.batch_size:
            return False
        if self.pixels is not None and pixels.shape != self.pixels.shape:
            return False
        controller = run.controller
        return not (controller is not None and controller.config.enabled and controller.update_due())

    def step(self, run: Run, batch: dict) -> tuple[dict[str, torch.Tensor], float]:
        """Take the optimizer step of ``batch`` (a full, clean one: :meth:`takes`); its loss terms and
        learning rate."""
        ok = len(batch["label"])
        run.failures.add_batch([], ok)
        run.health.count_samples(run)  # under DDP into the graph's all-reduce, as in the eager step
        lr = lr_at(run.progress.global_step, run.config, run.plan.total_steps)
        set_lr(run.optimizer, lr)
        self._load(batch, run.env.device)
        phase = run.controller is not None and run.controller.masking
        if phase != self.phase:
            self._drop_graph()
            self.phase, self.warm_steps = phase, 0
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            outputs = self.outputs
        elif not self.capture or self.warm_steps < self.warmup:
            with side_stream(self.capture):
                outputs = self._body(run)
            run.optimizer.zero_grad(set_to_none=True)
            self.warm_steps += 1
        else:
            outputs = self._capture(run)
        if run.controller is not None:
            run.controller.advance()
        terms, norms = _snapshot(*outputs)
        run.health.record(run, [terms], list(self.grad_names), norms)
        return terms, lr

    # -- the graph -----------------------------------------------------------------------------------------
    def _body(self, run: Run) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The step on the device: what the eager loop's micro-step and optimizer step do, with no host
        bookkeeping (a replay runs none of this Python)."""
        from .loop import apply_update

        with autocast_for(run.env.device, run.config.precision, cache=False):
            logits = run.model(self.pixels)
        loss, terms = total_loss(logits, self.labels, run.detector, run.masm_cfg, run.layer_groups)
        loss.backward()
        named = [(n, p.grad) for n, p in run.health.named_trainable if p.grad is not None]
        self.grad_names = [n for n, _ in named]
        skip, norms = run.health.flags([terms["total"]], [g for _, g in named])
        apply_update(run, skip, advance=False)
        return terms, norms

    def _capture(self, run: Run) -> tuple:
        run.optimizer.zero_grad(set_to_none=True)  # the backward in the graph allocates, not accumulates
        graph, outputs = capture_graph(lambda: self._body(run))
        # The gradients live in the graph's memory pool from here on: dropped from the parameters, so that
        # an eager step after a replay starts from none, as the loop's steps do.
        run.optimizer.zero_grad(set_to_none=True)
        self.kept = [group.__dict__.get("_operands") for group in run.layer_groups]
        self.graph, self.outputs = graph, outputs
        graph.replay()  # the capture recorded the step; this takes it
        self.replays += 1
        return outputs

    def _drop_graph(self) -> None:
        if self.graph is not None:
            torch.cuda.synchronize()
        self.graph, self.outputs, self.kept = None, None, []

    def _load(self, batch: dict, device: torch.device) -> None:
        pixels, labels = batch["pixel_values"], batch["label"]
        if self.pixels is None:
            self.pixels = torch.empty(pixels.shape, dtype=pixels.dtype, device=device)
            self.labels = torch.empty(labels.shape, dtype=labels.dtype, device=device)
        self.pixels.copy_(pixels, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)


def _snapshot(
    terms: dict[str, torch.Tensor], norms: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The step's loss terms and gradient norms copied out of the graph's outputs, in one kernel."""
    parts = [t.reshape(1).float() for t in terms.values()]
    if norms is not None:
        parts.append(norms.float())
    flat = torch.cat(parts)
    copied = {name: flat[i] for i, name in enumerate(terms)}
    return copied, (flat[len(terms) :] if norms is not None else None)


def capture_graph(fn):
    """``(graph, fn's outputs)``: ``fn`` captured as a CUDA graph (not run: ``graph.replay()`` runs it)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the loader's pin-memory thread may keep working while the step is captured
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs


@contextlib.contextmanager
def side_stream(on_cuda: bool):
    """Run on a side stream that joins the current one before and after (warm-up before a capture)."""
    if not on_cuda:
        yield
        return
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)

"""``masm bench speed``: training-step time, inference time and peak memory of MASM vs the baselines.

Step times are medians of ``--steps`` timed steps after ``--warmup`` untimed ones, all methods in one
process and timed round-robin (one step of each method per round, the order rotating). A step-time ratio
is the median over rounds of the ratio of the two methods' steps in that round, so that the machine's
drift over minutes and its bursts of load do not enter the ratios. Memory is measured for each method in its own
fresh process, so that its peak is its own. Every method trains on the same random batch. A training step
is what the trainer does: forward, the method's full loss (MASM's regularisers included), backward, the
selective mask and semantic guard around Adam, and the trainer's on-device check that the step is finite
(:mod:`masm.training.health`) with the fused Adam skipping on it. MASM is timed in its steady state: the
mask active, with some layers paused whole and some in part, as in the demo's run (:func:`steady_mask`;
the JSON records what was paused). Compared:

* ``masm``: K=4, m=4 subspaces on the attention projections, low-rank forward;
* ``fmsd``: MASM on the fraction ``select.fraction`` (default 0.5) of the attention projections that FMSD
  adapts, the mask's subspace balance on. Its selection phase runs once before training and is not part of
  a step, so here the layers are fixed instead of selected: spread evenly over the targets in model order,
  the first one included, so that backward runs down to the first block as it does for ``masm``. A real
  selection that skips the early blocks makes a step cheaper still (backward stops at the lowest adapted
  layer); this row measures only the saving of adapting fewer layers;
* ``effort-reference``: Effort's reference formula, ``W_main + U diag(S) Vᵀ`` rebuilt every forward
  (:mod:`masm.benchmarks.effort_reference`);
* ``effort``: the same Effort model (K=1, m=1) on MASM's low-rank code path;
* ``lora`` (peft, rank 16, same targets) and ``full`` fine-tuning;
* ``masm-path-only``: MASM's K=4, m=4 subspaces on the low-rank path and nothing else (semantic guard,
  regularisers and mask off): what the adapter's own matmuls cost, apart from what MASM adds to them;
* ``frozen-floor``: every weight frozen, only the targeted Linears' biases train. Backward then carries the
  input gradient through every adapted layer, as any method that trains those layers must, and computes no
  weight gradient and no adapter work. It is the least step time an adapter on these layers can have, so
  ``floor_vs_effort_step`` bounds from below what ``masm_vs_effort_step`` can reach on the machine.

Inference compares the merged MASM detector with the plain backbone (+ head), interleaving the two.
Memory: on CUDA, peak allocated bytes above those allocated after the model was built. On CPU there is no
allocator to ask, and the resident set size mostly shows what glibc keeps cached, so the training memory is
counted exactly from the tensors instead: activations saved for backward (unique storages, through
``torch.autograd.graph.saved_tensors_hooks``) + gradients + optimizer state. ``ops/step``: the ATen
operations one training step dispatches (:func:`count_dispatched_ops`), what bounds a GPU step at small
batches; ``syncs/step``: those of them that make the host wait for the device; ``GFLOP/step``: its
arithmetic (:func:`count_flops`), what bounds a step where each operation is large.

The package, by job: :mod:`.methods` (the methods timed and how each is built), :mod:`.step` (one
method's training step), :mod:`.counting` (operations, syncs, arithmetic, memory), :mod:`.harness` (which
measurement runs in which process), :mod:`.report` (ratios, targets, tables) and :mod:`.command` (the
options and a run from them).
"""

from __future__ import annotations

from .command import add_arguments, run
from .counting import HOST_SYNC_OPS, count_dispatched_ops, count_flops
from .harness import run_speed_benchmark
from .methods import TRAIN_METHODS, SpeedSettings, _build, spread_evenly
from .report import TARGETS, format_results, speed_ratios
from .step import _setup, _TrainingStep, steady_mask

__all__ = [
    "HOST_SYNC_OPS",
    "TARGETS",
    "TRAIN_METHODS",
    "SpeedSettings",
    "_TrainingStep",
    "_build",
    "_setup",
    "add_arguments",
    "count_dispatched_ops",
    "count_flops",
    "format_results",
    "run",
    "run_speed_benchmark",
    "speed_ratios",
    "spread_evenly",
    "steady_mask",
]

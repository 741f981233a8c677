"""Whether an optimizer step may update anything, decided on the device, and read on the host only at
check points.

A step whose loss or gradient is not finite (on any rank) must change nothing: not the weights, not the
optimizer's moments, not the mask's running averages. Asking the host every step costs a device sync per
step, which stalls a GPU's queue. So the decision stays a device flag, handed to the fused optimizer
(``found_inf``: it skips the update and its step count), to the mask and to the guard. The flag is sticky:
after a non-finite step every later step is skipped too, so the state stays that of the last good step
until the host looks, at the next check point (a log step, a validation, a checkpoint, the end), and stops
the run with the first bad step named. The values that name it (loss terms, gradient norms) are kept by
reference until then: no copy, no operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import MasmError
from . import distributed as dist_utils

if TYPE_CHECKING:
    from .run_state import Run


@dataclass
class _StepRecord:
    step: int  # 1-based optimizer step
    epoch: int  # 1-based
    terms: list[dict[str, torch.Tensor]]
    grad_names: list[str]
    grad_norms: torch.Tensor | None


class StepHealth:
    def __init__(self, model: torch.nn.Module, device: torch.device, distributed: bool):
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.distributed = distributed
        self.poisoned = torch.zeros((), dtype=torch.bool, device=device)
        self.records: list[_StepRecord] = []
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # (ok, failed) over ranks, DDP
        self.step_counts = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's, this step

    def decide(self, run: Run) -> torch.Tensor:
        """The skip flag of the step about to be taken (a device tensor); counts this rank's samples."""
        losses = [t["total"] for t in run.group_terms]
        named = [(n, p.grad) for n, p in self.named_trainable if p.grad is not None]
        self.count_samples(run)
        skip, norms = self.flags(losses, [g for _, g in named])
        self.record(run, list(run.group_terms), [n for n, _ in named], norms)
        return skip

    def count_samples(self, run: Run) -> None:
        """Count this rank's samples of the coming step: in the ledger alone, into :meth:`flags`'s
        all-reduce under DDP (the counts then reach the ledger at a check point)."""
        ok, failed = run.failures.take_pending()
        if self.distributed:
            self.set_counts(ok, failed)
        else:
            run.failures.add_step(ok, failed)

    def set_counts(self, ok: int, failed: int) -> None:
        """This rank's samples of the coming step (under DDP; written in place, for :meth:`flags`)."""
        self.step_counts[0].fill_(ok)
        self.step_counts[1].fill_(failed)

    def flags(
        self, losses: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(skip, each gradient's max-norm)`` of the step, on the device, the sticky flag updated.

        Device work only, every tensor it keeps updated in place, so that a CUDA graph of the step
        (:mod:`.cuda_graph`) replays it: under DDP one all-reduce carries the flags and
        :meth:`set_counts`'s sample counts, and no rank with a sample means skip.
        """
        bad_loss, bad_grad, norms = not_finite(losses, grads, self.poisoned.device)
        empty = None
        if self.distributed:  # one all-reduce, no host read: the ranks agree on the device
            flags = torch.cat([torch.stack([bad_loss, bad_grad]).double(), self.step_counts])
            torch.distributed.all_reduce(flags)
            bad_loss, bad_grad = flags[0] > 0, flags[1] > 0
            empty = flags[2] == 0
            self.counts += flags[2:]
        bad = bad_loss | bad_grad
        skip = self.poisoned | bad
        if empty is not None:
            skip = skip | empty
        self.poisoned.logical_or_(bad)
        return skip, norms

    def record(self, run: Run, terms: list[dict], names: list[str], norms: torch.Tensor | None) -> None:
        """Keep what names a bad step (by reference: no copy, no operation) until the next check point."""
        progress = run.progress
        self.records.append(_StepRecord(progress.global_step + 1, progress.epoch + 1, terms, names, norms))

    def check(self, run: Run) -> None:
        """At a check point: stop the run if a step was not finite (naming the first), or if too many
        samples failed (under DDP, where the counts live on the device until now)."""
        records, self.records = self.records, []
        if self.distributed:
            ok, failed = (int(v) for v in self.counts.tolist())
            self.counts.zero_()
            run.failures.add_step(ok, failed)
        if bool(self.poisoned):
            _raise_not_finite(run, records)
        if self.distributed and run.failures.exceeded():
            first = [f for rank in dist_utils.gather_objects(run.env, run.failures.first) for f in rank]
            raise run.failures.error(first)


def not_finite(
    losses: list[torch.Tensor], grads: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(a loss is not finite, a gradient is not finite, each gradient's max-norm)``, on the device."""
    false = torch.zeros((), dtype=torch.bool, device=device)
    norms = torch.stack(torch._foreach_norm(grads, float("inf"))) if grads else None
    bad_loss = ~torch.stack(losses).isfinite().all() if losses else false
    bad_grad = ~norms.isfinite().all() if norms is not None else false
    return bad_loss, bad_grad, norms


def _raise_not_finite(run: Run, records: list[_StepRecord]) -> None:
    last = run.checkpoints.last_dir if run.checkpoints.saved_last else "none (no checkpoint was saved yet)"
    for record in records:
        where = f"at step {record.step} (epoch {record.epoch})"
        bad_terms = [t for t in record.terms if not torch.isfinite(t["total"])]
        if bad_terms:
            detail = {k: float(v) for k, v in bad_terms[0].items()}
            raise MasmError(f"loss is not finite {where}: {detail}; last good checkpoint: {last}")
        if record.grad_norms is not None and not bool(record.grad_norms.isfinite().all()):
            bad = [n for n, ok in zip(record.grad_names, record.grad_norms.isfinite().tolist()) if not ok]
            _raise_bad_gradient(where, bad, last)
    # the bad step was on another rank: its values are not here
    where = f"at step {records[0].step if records else '?'} or later"
    raise MasmError(f"loss or gradient is not finite on another rank {where}; last good checkpoint: {last}")


def _raise_bad_gradient(where: str, names: list[str], last) -> None:
    raise MasmError(
        f"gradient is not finite {where} although the loss is finite: parameter {names[0]!r}"
        + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        + "; the step was refused (weights, optimizer and mask state as before it) and the run stopped; "
        f"lower optim.lr or use precision: fp32; last good checkpoint: {last}"
    )

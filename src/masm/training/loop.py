"""The training loop: micro-batches, gradient accumulation, the optimizer step, and when to log, validate
and save.

Per optimizer step the loop waits for the device once: one all-reduce carries whether a loss or gradient
of the step is not finite and how many samples loaded or failed on every rank, so every rank takes the
same decision (step, skip a step whose every sample failed, or stop).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch

from ..errors import MasmError
from ..method import subspace_update, total_loss
from ..precision import autocast_for
from . import distributed as dist_utils
from .optim import lr_at, set_lr

if TYPE_CHECKING:
    from .trainer import Run


def fit(run: Run) -> None:
    """Train from ``run.progress`` to the end of the run (epochs or ``max_steps``)."""
    cfg, plan = run.config, run.plan
    accum = cfg.optim.grad_accum_steps
    started = time.time()
    sums: dict[str, torch.Tensor] = {}
    count, lr = 0, lr_at(run.progress.global_step, cfg, plan.total_steps)
    while run.progress.epoch < cfg.epochs and not _reached_max(run):
        epoch = run.progress.epoch
        skip_micro = run.progress.step_in_epoch * accum
        plan.start_epoch(epoch, cfg.seed, skip_micro)
        bar = run.progress_bar(epoch)
        in_group = group_size = 0
        for micro, batch in enumerate(plan.loader, start=skip_micro):
            if in_group == 0:  # the epoch's last group may hold fewer micro-batches
                group_size = min(accum, plan.micro_per_epoch - micro)
            in_group += 1
            closes_group = in_group == group_size
            terms = _micro_step(run, batch, sync=closes_group, group_size=group_size)
            if terms is not None:
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            if not closes_group:
                continue
            in_group = 0
            lr = _optimizer_step(run)
            run.progress.global_step += 1
            run.progress.step_in_epoch += 1
            bar.update(1)
            if run.progress.global_step % cfg.log_every == 0:  # on every rank: the log all-reduces
                loss = _flush_log(run, sums, count, lr, started)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                sums, count = {}, 0
            if cfg.eval_unit == "step" and cfg.eval_every and run.progress.global_step % cfg.eval_every == 0:
                run.validate()
            if cfg.checkpoint_every and run.progress.global_step % cfg.checkpoint_every == 0:
                run.save_last()
            if run.on_step is not None:
                run.on_step(run.progress)
            if _reached_max(run):
                break
        bar.close()
        if _reached_max(run) and run.progress.step_in_epoch < plan.steps_per_epoch:
            break
        run.progress.epoch += 1
        run.progress.step_in_epoch = 0
        if cfg.eval_unit == "epoch" and cfg.eval_every and run.progress.epoch % cfg.eval_every == 0:
            run.validate()
        run.save_last()
    if run.progress.global_step % cfg.log_every:  # steps since the last record
        _flush_log(run, sums, count, lr, started)


def _reached_max(run: Run) -> bool:
    return bool(run.config.max_steps) and run.progress.global_step >= run.config.max_steps


def _micro_step(run: Run, batch: dict, sync: bool, group_size: int) -> dict[str, torch.Tensor] | None:
    """Forward and backward of one micro-batch, its loss scaled by 1 / (micro-batches in its group).

    Under DDP a micro-batch whose every sample failed still runs a forward and backward (one blank frame,
    its output weighted 0), so that every rank joins the same gradient all-reduce with a zero
    contribution; the step is skipped on every rank when no rank had a sample (:func:`_step_flags`).
    Nothing here waits for the device.
    """
    env, cfg = run.env, run.config
    ok = 0 if batch["pixel_values"] is None else len(batch["label"])
    run.failures.add_batch(batch["failed"], ok)
    if not ok and not env.distributed:  # alone, there is no all-reduce to join
        return None
    if ok:
        pixels = batch["pixel_values"].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
    else:
        size = run.detector.preprocessing.input_size
        pixels = torch.zeros(1, 3, size, size, device=env.device)
    context = contextlib.nullcontext() if sync or not env.distributed else run.model.no_sync()
    with context:
        with autocast_for(env.device, cfg.precision):
            logits = run.model(pixels)
        if not ok:
            (0.0 * logits.float().sum()).backward()  # every parameter gets a zero gradient
            return None
        loss, terms = total_loss(logits, labels, run.detector, run.masm_cfg, run.layer_groups)
        (loss / group_size).backward()
    run.group_terms.append(terms)
    return terms


def _step_flags(run: Run) -> tuple[bool, bool, int]:
    """``(loss not finite, gradient not finite, samples of the step)`` over all ranks; counts failures.

    One all-reduce and one host sync per optimizer step, before the mask and the optimizer see the
    gradients, so neither Adam's moments nor the mask's running averages are ever poisoned.
    """
    env = run.env
    losses = [t["total"] for t in run.group_terms]
    zero = torch.zeros((), device=env.device)
    bad_loss = (~torch.stack(losses).isfinite().all()).float() if losses else zero
    grads = [p.grad for p in run.detector.trainable_parameters() if p.grad is not None]
    bad_grad = (
        (~torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()).float() if grads else zero
    )
    ok, failed = run.failures.take_pending()
    flags = torch.stack([bad_loss, bad_grad, zero + ok, zero + failed]).double()
    if env.distributed:
        torch.distributed.all_reduce(flags)
    bad_loss_n, bad_grad_n, ok_n, failed_n = flags.tolist()
    run.failures.add_step(int(ok_n), int(failed_n))
    return bad_loss_n > 0, bad_grad_n > 0, int(ok_n)


def _optimizer_step(run: Run) -> float:
    bad_loss, bad_grad, samples = _step_flags(run)
    terms, run.group_terms = run.group_terms, []
    if bad_loss or bad_grad:
        _raise_not_finite(run, terms, bad_loss)
    if run.failures.exceeded():
        first = [f for rank in dist_utils.gather_objects(run.env, run.failures.first) for f in rank]
        raise run.failures.error(first)
    lr = lr_at(run.progress.global_step, run.config, run.plan.total_steps)
    if samples == 0:  # every sample of the step failed, on every rank: nothing to learn from
        run.optimizer.zero_grad(set_to_none=True)
        return lr
    set_lr(run.optimizer, lr)
    # gradients are DDP-averaged here. The guard projects them; the mask sets paused subspaces aside and
    # puts them back after the step; the guard holds exactly after Adam and weight decay.
    with subspace_update(run.detector, run.optimizer, run.controller, run.layer_groups):
        if run.config.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                run.detector.trainable_parameters(), run.config.optim.max_grad_norm
            )
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr


def _raise_not_finite(run: Run, terms: list[dict[str, torch.Tensor]], bad_loss: bool) -> None:
    where = f"at step {run.progress.global_step + 1} (epoch {run.progress.epoch + 1})"
    last = run.checkpoints.last_dir if run.checkpoints.saved_last else "none (no checkpoint was saved yet)"
    if bad_loss:
        bad = [t for t in terms if not torch.isfinite(t["total"])]
        detail = {k: float(v) for k, v in bad[0].items()} if bad else "on another rank"
        raise MasmError(f"loss is not finite {where}: {detail}; last good checkpoint: {last}")
    names = [
        name
        for name, p in run.detector.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]
    raise MasmError(
        f"gradient is not finite {where} although the loss is finite: parameter "
        f"{names[0] if names else '(on another rank)'!r}"
        + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        + "; the step was refused (optimizer and mask state unchanged); lower optim.lr or use "
        f"precision: fp32; last good checkpoint: {last}"
    )


def _flush_log(
    run: Run, sums: dict[str, torch.Tensor], count: int, lr: float, started: float
) -> float | None:
    """Write the mean loss terms since the last record over all ranks; returns the mean total loss.

    Called on every rank at the same steps. A rank whose every sample failed has no terms, so the ranks
    first agree on the names (one small gather, on log steps only).
    """
    env = run.env
    names = sorted(sums)
    if env.distributed:
        names = sorted({n for rank in dist_utils.gather_objects(env, names) for n in rank})
    zero = torch.zeros((), device=env.device)
    values = torch.stack([sums.get(n, zero) for n in names] + [zero + count]).double()
    if env.distributed:
        torch.distributed.all_reduce(values)
    *totals, global_count = values.tolist()
    if not global_count:
        return None
    means = {n: total / global_count for n, total in zip(names, totals)}
    run.log(
        {
            "kind": "train",
            "step": run.progress.global_step,
            "epoch": run.epoch_float(),
            "lr": lr,
            **{n: round(v, 6) for n, v in means.items()},
            "frames_failed": run.failures.failed,
            "elapsed_s": round(time.time() - started, 2),
        }
    )
    return means.get("total")

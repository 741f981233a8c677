"""The training loop: micro-batches, gradient accumulation, the optimizer step, and when to log, validate
and save.

A steady-state step never waits for the device: whether the step may update anything (its loss and
gradients finite on every rank, a sample on some rank) is a device flag that the fused optimizer, the mask
and the guard obey (:mod:`.health`); under DDP one all-reduce carries it and the sample counts. The host
reads it only at check points: log steps, validations, checkpoints and the end of the run.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch

from ..method import subspace_update, total_loss
from ..precision import autocast_for
from . import distributed as dist_utils
from .optim import lr_at, set_lr

if TYPE_CHECKING:
    from .run_state import Run


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
            captured = run.captured is not None and run.captured.takes(run, batch)
            if captured:  # the whole step, one CUDA graph (cuda_graph: true; one micro-batch a step)
                terms, lr = run.captured.step(run, batch)
            else:
                terms = _micro_step(run, batch, sync=closes_group, group_size=group_size)
            if terms is not None:
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            if not closes_group:
                continue
            in_group = 0
            if not captured:
                lr = _optimizer_step(run)
            run.progress.global_step += 1
            run.progress.step_in_epoch += 1
            bar.update(1)
            if run.progress.global_step % cfg.log_every == 0:  # on every rank: the log all-reduces
                run.health.check(run)
                loss = _flush_log(run, sums, count, lr, started)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                sums, count = {}, 0
            if cfg.eval_unit == "step" and cfg.eval_every and run.progress.global_step % cfg.eval_every == 0:
                run.health.check(run)
                run.validate()
            if cfg.checkpoint_every and run.progress.global_step % cfg.checkpoint_every == 0:
                run.health.check(run)
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
        run.health.check(run)
        if cfg.eval_unit == "epoch" and cfg.eval_every and run.progress.epoch % cfg.eval_every == 0:
            run.validate()
        run.save_last()
    run.health.check(run)
    if run.progress.global_step % cfg.log_every:  # steps since the last record
        _flush_log(run, sums, count, lr, started)


def _reached_max(run: Run) -> bool:
    return bool(run.config.max_steps) and run.progress.global_step >= run.config.max_steps


def _micro_step(run: Run, batch: dict, sync: bool, group_size: int) -> dict[str, torch.Tensor] | None:
    """Forward and backward of one micro-batch, its loss scaled by 1 / (micro-batches in its group).

    Under DDP a micro-batch whose every sample failed still runs a forward and backward (one blank frame,
    its output weighted 0), so that every rank joins the same gradient all-reduce with a zero
    contribution; the step is skipped on every rank when no rank had a sample (:mod:`.health`).
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


def _optimizer_step(run: Run) -> float:
    samples_here = run.failures.pending_ok  # this rank's; alone, the step's
    skip = run.health.decide(run)
    run.group_terms = []
    lr = lr_at(run.progress.global_step, run.config, run.plan.total_steps)
    if not run.env.distributed:
        if run.failures.exceeded():
            raise run.failures.error(run.failures.first)
        if samples_here == 0:  # every sample of the step failed: nothing to learn from
            run.optimizer.zero_grad(set_to_none=True)
            return lr
    set_lr(run.optimizer, lr)
    apply_update(run, skip)
    run.optimizer.zero_grad(set_to_none=True)
    return lr


def apply_update(run: Run, skip: torch.Tensor, advance: bool = True) -> None:
    """The optimizer step proper, on the device: guard, mask, clipping and the fused update, each obeying
    the ``skip`` flag. ``advance=False`` in a captured step (:mod:`.cuda_graph`), which counts the mask's
    steps on the host itself."""
    run.optimizer.found_inf = skip.float()  # the fused optimizer skips the update on the device
    # gradients are DDP-averaged here. The guard projects them; the mask sets paused subspaces aside and
    # puts them back after the step; the guard holds exactly after Adam and weight decay.
    with subspace_update(
        run.detector, run.optimizer, run.controller, run.layer_groups, skip=skip, advance=advance
    ):
        if run.config.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                run.detector.trainable_parameters(), run.config.optim.max_grad_norm
            )
        run.optimizer.step()


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
            **({} if run.captured is None else {"graph_replays": run.captured.replays}),
            "elapsed_s": round(time.time() - started, 2),
        }
    )
    return means.get("total")

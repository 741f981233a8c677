"""The timing harness of ``masm bench speed``: which measurement runs in which process, and in what order.

Memory, operation and arithmetic counts are taken for each method in its own fresh process, so that its
peak is its own; step times for all methods in one process, round-robin (one step of each method per
round, the order rotating), so that each ratio compares steps taken under the same conditions; inference
(the merged detector against the plain backbone, interleaved) in a third.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context

from ..common import machine_info
from .counting import _PeakMemory, _training_memory_mb, count_dispatched_ops, count_flops
from .methods import TRAIN_METHODS, SpeedSettings, _build
from .report import speed_report
from .step import _setup, _sync, _TrainingStep


def run_speed_benchmark(
    settings: SpeedSettings, methods: list[str] = TRAIN_METHODS, memory_only=False
) -> dict:
    """Measure ``methods`` under ``settings``: the result ``masm bench speed`` writes (``memory_only``:
    training memory and counts only, no step times, no inference, no ratios)."""
    train = {method: _in_fresh_process(_memory_worker, method, settings) for method in methods}
    if memory_only:
        return {"settings": asdict(settings), "machine": machine_info(), "train": train, "ratios": {}}
    times = _in_fresh_process(_timing_worker, methods, settings)
    for method in methods:
        train[method]["step_s"] = statistics.median(times[method])
        train[method]["step_times_s"] = times[method]
    infer = _in_fresh_process(_infer_worker, "masm", settings)
    return speed_report(settings, train, times, infer)


# -- workers (run in fresh processes) ---------------------------------------------------------------------
# glibc returns large freed blocks to the OS and maps them again on the next allocation, so each step pays
# page faults for its activations, and how many depends on what the previous step (of another method)
# freed: the floor's step times spread over 2.36-2.90 s without these settings, 2.32-2.57 s with them.
# Fixed thresholds keep freed memory in the process; they apply to the benchmark's worker processes only.
_STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def _in_fresh_process(fn, what, settings: SpeedSettings) -> dict:
    """``fn(what, settings)`` in a new spawned process with the steady malloc settings above."""
    saved = {key: os.environ.get(key) for key in _STEADY_MALLOC}
    os.environ.update({key: value for key, value in _STEADY_MALLOC.items() if saved[key] is None})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, what, settings).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _timing_worker(methods: list[str], settings: SpeedSettings) -> dict[str, list[float]]:
    """Step times of every method, measured round-robin in one process.

    A shared 2-core machine drifts by several per cent over minutes; timing one method after the other
    puts that drift into the ratios. Here every round times one step of each method, and the order rotates
    from round to round, so each ratio compares steps taken under the same conditions.
    """
    device = _setup(settings)
    steps = {method: _TrainingStep(method, settings, device, settings.cuda_graph) for method in methods}
    for _ in range(settings.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(settings.steps):
        shift = round_ % len(methods)
        for method in methods[shift:] + methods[:shift]:
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
    return times


def _memory_worker(method: str, settings: SpeedSettings) -> dict:
    """Training memory and trainable parameters of one method, in its own process (so the peak is its own)."""
    device = _setup(settings)
    step = _TrainingStep(method, settings, device)
    step()  # the optimizer's state exists from the first step on
    with _PeakMemory(device) as memory:
        step()
    if device.type == "cuda":
        peak_mb = memory.peak_mb
    else:
        peak_mb = _training_memory_mb(step.detector, step.x, step.params, step.optimizer)
    ops, syncs = (None, None) if settings.compile else count_dispatched_ops(step)
    return {
        "peak_mem_mb": peak_mb,
        "trainable": sum(p.numel() for p in step.params),
        "ops_per_step": ops,
        "syncs_per_step": syncs,
        "gflop_per_step": None if settings.compile else count_flops(step) / 1e9,
        **({"mask": step.mask_state} if step.mask_state else {}),
    }


def _infer_worker(method: str, settings: SpeedSettings) -> dict:
    """Forward times of the merged ``method`` detector and of the plain one, interleaved, in one process."""
    import torch

    device = _setup(settings)
    plain, _ = _build("linear", settings)
    merged, _ = _build(method, settings)
    merged.merge()
    plain.to(device).eval()
    merged.to(device).eval()
    size = plain.preprocessing.input_size
    x = torch.randn(settings.batch_size, 3, size, size, device=device)
    times = {"plain": [], "merged": []}
    from masm.precision import autocast_for

    with torch.inference_mode(), autocast_for(device, settings.precision):
        for i in range(settings.warmup + settings.steps):
            for name, model in (
                (("plain", plain), ("merged", merged))
                if i % 2 == 0
                else (("merged", merged), ("plain", plain))
            ):
                start = time.perf_counter()
                model(x)
                _sync(device)
                if i >= settings.warmup:
                    times[name].append(time.perf_counter() - start)
    return {
        "plain_s": statistics.median(times["plain"]),
        "merged_s": statistics.median(times["merged"]),
        "plain_times_s": times["plain"],
        "merged_times_s": times["merged"],
    }

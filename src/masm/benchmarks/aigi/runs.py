"""One run of the benchmark: a method trained on the training generator's fakes, tested on every generator.

Training goes through the shared trainer with ``masm bench quality``'s settings
(:func:`masm.demo.experiment.train_config`: the method preset, the budget, the demo backbone), with two
differences: the fakes are files (the training generator's reconstructions), so no pseudo-fakes are made on
the fly, and checkpoint selection sees the training generator only. Runs go one after another, or spread
over processes of one thread each (a result does not depend on how many).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .data import AigiSplits

# train_config reads a pseudo-fake recipe from the comparison's splits; this benchmark's fakes are files and
# pseudo-fakes are off (probability 0), so any valid recipe stands in.
_NO_PSEUDO_FAKE_SPLITS = SimpleNamespace(train_families=["blend"], strength=1.0)
PSEUDO_FAKES_OFF = {"data": {"pseudo_fakes": {"probability": 0.0, "post_process": False}}}
METRICS = ("acc", "ap", "auc")  # frame level; acc: the raw P(fake) thresholded at 0.5


def aigi_train_config(method: str, settings, seed: int, overrides: dict[str, Any] | None = None):
    """The :class:`TrainConfig` of one run (``settings``: a :class:`masm.demo.experiment.RunSettings`)."""
    from ...config import merge_dicts
    from ...demo.experiment import train_config

    return train_config(
        method, _NO_PSEUDO_FAKE_SPLITS, settings, seed, merge_dicts(PSEUDO_FAKES_OFF, overrides or {})
    )


def generator_metrics(test_result: dict, splits: AigiSplits) -> tuple[dict, dict]:
    """``({generator: {acc, ap, auc}}, {acc, ap, auc})`` from an evaluation of ``splits.test``: each
    generator's fakes against every real crop, and the mean over the generators not seen in training."""
    families = test_result["families"]
    per_generator = {g: {k: families[g]["frame"][k] for k in METRICS} for g in splits.generators}
    unseen = [per_generator[g] for g in splits.test_generators]
    mean = {k: statistics.mean(m[k] for m in unseen) if unseen else None for k in METRICS}
    return per_generator, mean


def run_one(
    method: str, seed: int, out: Path, splits: AigiSplits, settings, threads: int | None = None
) -> dict:
    """Train ``method`` with ``seed`` into ``out`` and test its best checkpoint on every generator."""
    import torch

    from ...demo.experiment import attention_weight_change, trainable_count
    from ...evaluation.evaluate import evaluate_detector
    from ...models import load_checkpoint
    from ...training import train

    if threads is not None:  # a worker process: one intra-op thread each, so workers do not fight
        torch.set_num_threads(threads)
    config = aigi_train_config(method, settings, seed)
    start = time.perf_counter()
    result = train(config, out, progress=False, train_data=splits.train, val_data=splits.val, overwrite=True)
    train_seconds = time.perf_counter() - start
    detector = load_checkpoint(result.best_checkpoint, merge=True)
    evaluation = evaluate_detector(
        detector, [splits.test], frames=1, progress=False, device="cpu", num_workers=0
    )
    per_generator, mean = generator_metrics(evaluation["datasets"][splits.test.name], splits)
    return {
        "method": method,
        "seed": seed,
        "generators": per_generator,
        "mean_unseen": mean,
        "val_auc": result.best_metric,
        "best_step": result.best_step,
        "train_seconds": round(train_seconds, 2),
        "trainable_params": trainable_count(result.best_checkpoint),
        "attn_weight_change": attention_weight_change(detector.backbone, settings.backbone),
        "checkpoint": str(result.best_checkpoint),
    }


def run_all(jobs: list[tuple[str, int, Path]], splits: AigiSplits, settings, workers: int):
    """Results of ``jobs`` (method, seed, folder), in completion order; ``workers`` > 1 runs them in that
    many processes, one thread each."""
    if workers <= 1:
        for method, seed, out in jobs:
            yield run_one(method, seed, out, splits, settings)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(run_one, m, s, out, splits, settings, 1) for m, s, out in jobs]
        for future in as_completed(futures):
            yield future.result()

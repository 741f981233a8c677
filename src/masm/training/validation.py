"""Validation during training: score the selection sets, and decide whether the model is the best so far.

``best`` is selected on the training set's validation split (the protocol), or on the mean test frame AUC
(``select_on: test``, DeepfakeBench parity only). It is only ever replaced by a better model under the
same selection rule (:attr:`Selection.rule`): a run resumed with other selection sets starts a new best.
"""

from __future__ import annotations

from typing import Any

from ..data.transforms import build_transform
from ..errors import DataError
from ..evaluation.evaluate import metrics_for
from ..evaluation.metrics import mean_over_datasets
from ..evaluation.scoring import Shard, score_sharded
from . import distributed as dist_utils
from .config import TrainConfig
from .data import RunData


class Selection:
    """The sets ``best`` is selected on, and the metric: frame AUC (mean over sets when several)."""

    def __init__(self, config: TrainConfig, data: RunData):
        self.config = config
        if config.select_on == "test":
            self.sets = {f"{i}:{t.name}": t for i, t in enumerate(data.tests)}
        else:
            self.sets = {data.val.name: data.val} if data.val is not None else {}

    @property
    def rule(self) -> str:
        """What a best metric means: comparable only between validations under one rule."""
        sources = ",".join(index.source or name for name, index in self.sets.items())
        return f"{self.config.select_on}:{sources}" if self.sets else "none"

    def score(self, detector, env: dist_utils.DistEnv) -> tuple[float | None, dict[str, Any]]:
        """Every rank scores its share of each set; rank 0 gets ``(metric, {set: metrics})``."""
        cfg = self.config
        transform = build_transform(detector.preprocessing, train=False, seed=cfg.seed)
        results: dict[str, dict] = {}
        for name, index in self.sets.items():
            scored = score_sharded(
                detector,
                index.records,
                transform,
                Shard(env.rank, env.world_size),
                batch_size=cfg.data.eval_batch_size,
                num_workers=cfg.data.num_workers,
                device=env.device,
                precision=cfg.precision,
                progress=False,
            )
            if scored is not None:  # rank 0; selection needs no deployment metrics (no log-odds passed)
                scores, failed, _ = scored
                results[name], _ = metrics_for(index.records, scores, failed)
        metric = None
        if env.is_main:
            metric = (
                mean_over_datasets(results)["frame"]["auc"]
                if len(results) > 1
                else next(iter(results.values()))["frame"]["auc"]
            )
        metric = dist_utils.broadcast_object(env, metric)
        if metric is None:
            raise DataError("the selection sets have no defined frame AUC (one class only)")
        return metric, results


def eval_record(step: int, epoch: float, select_on: str, metric: float, results: dict) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of one validation."""
    return {
        "kind": "eval",
        "step": step,
        "epoch": epoch,
        "select_on": select_on,
        "metric": metric,
        "sets": {
            n: {"frame": r["frame"], "video": r["video"], "skipped": r["skipped"]["count"]}
            for n, r in results.items()
        },
    }

"""The state of one training run: what the loop (:mod:`.loop`), the health check (:mod:`.health`) and the
captured step (:mod:`.cuda_graph`) read and advance, and what the loop asks of the run (log, validate, save).

The trainer (:mod:`.trainer`) builds the run's parts (detector, optimizer, mask controller, loader, health
check, captured step) onto a :class:`Run`, resumes it and drives it; this module imports none of the modules
that receive a run, so that they can all name its type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import distributed as dist_utils
from .checkpoints import RunCheckpoints
from .config import config_to_dict
from .data import RunData
from .state import Progress
from .validation import Selection, eval_record

if TYPE_CHECKING:
    from ..method import SelectiveMaskController
    from ..models.detector import Detector
    from .data import TrainLoader
    from .failures import FailureLedger


class Run:
    """State of one training run: what the loop (:mod:`.loop`) reads and advances; see the module doc."""

    # The run's parts, built by the trainer (:func:`.trainer.build_run`) right after construction.
    detector: Detector
    masm_cfg: Any  # the method's MASMConfig; None when the method is no MASM
    layer_groups: list  # the detector's MASM layer groups, found once, not by a module walk every step
    controller: SelectiveMaskController | None
    optimizer: torch.optim.Optimizer
    health: Any  # a .health.StepHealth (not imported: health reads this module)
    model: torch.nn.Module  # the detector, wrapped by DDP and torch.compile when asked
    plan: TrainLoader
    failures: FailureLedger
    captured: Any  # a .cuda_graph.CapturedStep when cuda_graph: true, else None (not imported, as above)

    def __init__(self, config, out_dir: Path, env, data: RunData, progress_bar: bool, on_step):
        self.config = config
        self.out = out_dir
        self.env = env
        self.data = data
        self.show_progress = progress_bar and env.is_main
        self.on_step: Callable[[Progress], None] | None = on_step
        self.metrics_path = out_dir / "metrics.jsonl"
        self.checkpoints = RunCheckpoints(out_dir, env)
        self.selection = Selection(config, data)
        self.progress = Progress()
        self.last_val: dict[str, Any] | None = None
        self.last_eval_step = -1
        self.group_terms: list[dict[str, torch.Tensor]] = []  # loss terms of the open accumulation group

    # checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_info(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "global_step": self.progress.global_step,
            "epoch": self.progress.epoch,
            "seed": self.config.seed,
            "train_config": config_to_dict(self.config),
            "best_metric": self.progress.best_metric,
            "select_on": self.config.select_on,
            "selection_rule": self.progress.best_rule,
        }

    def save_last(self) -> None:
        state = {
            "progress": self.progress.to_json(),
            "scheduler": {
                "kind": self.config.optim.schedule,
                "step": self.progress.global_step,
                "total_steps": self.plan.total_steps,
            },
            "world_size": self.env.world_size,
            "batch_size": self.config.data.batch_size,
            "last_eval_step": self.last_eval_step,
            "failures": self.failures.state(),
        }
        info = self.checkpoint_info("last")
        self.checkpoints.save_last(self.detector, self.optimizer, self.controller, state, info)

    # validation --------------------------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Score the selection sets (sharded over ranks), log, and save ``best`` on improvement."""
        if not self.selection.sets:
            return None
        metric, results = self.selection.score(self.detector, self.env)
        if self.env.is_main:
            self.last_val = results
            step, epoch = self.progress.global_step, self.epoch_float()
            self.log(eval_record(step, epoch, self.config.select_on, metric, results))
        self.last_eval_step = self.progress.global_step
        if self.progress.best_metric is None or metric > self.progress.best_metric:
            self.progress.best_metric, self.progress.best_step = metric, self.progress.global_step
            self.progress.best_rule = self.selection.rule
            self.checkpoints.save_best(self.detector, self.checkpoint_info("best"))
        return metric

    def finish(self) -> None:
        """Final validation if the last step was not validated, then the final ``last`` and ``best``."""
        if self.selection.sets and self.last_eval_step != self.progress.global_step:
            self.validate()
        self.progress.finished = True
        if not self.selection.sets:  # nothing to select on: best is the final model (rule "none")
            self.progress.best_rule = self.selection.rule
            self.progress.best_step = self.progress.global_step
            self.checkpoints.save_best(self.detector, self.checkpoint_info("best"))
        self.save_last()
        dist_utils.barrier(self.env)

    # logging -----------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def epoch_float(self) -> float:
        return round(self.progress.epoch + self.progress.step_in_epoch / max(1, self.plan.steps_per_epoch), 4)

    def progress_bar(self, epoch: int):
        from ..evaluation.scoring import progress_bar as _progress_bar

        bar = _progress_bar(
            self.plan.steps_per_epoch, f"epoch {epoch + 1}/{self.config.epochs}", self.show_progress
        )
        if self.progress.step_in_epoch and hasattr(bar, "n"):
            bar.update(self.progress.step_in_epoch)
        return bar

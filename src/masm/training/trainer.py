"""``masm train``: one device or many (``torchrun``), resumable at any step, whatever killed it.

The trainer never branches on the fine-tuning method: it builds the detector with
:func:`~masm.models.create_detector`, trains its trainable parameters with Adam/AdamW on
:func:`~masm.method.total_loss`, and runs the :class:`~masm.method.SelectiveMaskController` when the method
has a mask. The parts live in their own modules: the data (:mod:`.data`), the optimizer and schedule
(:mod:`.optim`), the loop (:mod:`.loop`), validation (:mod:`.validation`), checkpoints (:mod:`.checkpoints`),
the run folder and resume's config (:mod:`.run_folder`), failed samples (:mod:`.failures`). Outputs of a run
in ``out_dir``::

    config.yaml             the resolved TrainConfig (trains again as it is)
    changes.jsonl           config changes a resume was allowed to make (``--resume-changed``)
    metrics.jsonl           one record per log step (loss terms, lr, failed samples) and per validation;
                            FMSD's layer selection (kind "select") first
    masks.jsonl             the mask controller's log (ρ and mask per interval)
    select.png              FMSD's layer selection: every targeted layer's score, the chosen ones marked
    data/*.jsonl            in-memory data the run was given, as ``frames:`` specs the config points to
    checkpoints/last/       model + optimizer + mask + RNG state + data position (resumable)
    checkpoints/best/       the model with the best validation frame AUC
    eval/                   the best model's report on the test sets (when any are configured)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, MasmError
from ..evaluation.evaluate import Shard, evaluate_detector
from ..method import SelectiveMaskController, layer_groups
from ..models.checkpoint import load_checkpoint
from ..models.detector import Detector, create_detector
from ..precision import configure_matmul_precision
from . import cuda_graph, run_folder
from . import distributed as dist_utils
from .checkpoints import RunCheckpoints, truncate_jsonl
from .config import TrainConfig, config_to_dict
from .data import DataArg, RunData, build_train_loader, open_run_data, record_in_memory_data
from .failures import FailureLedger
from .health import StepHealth
from .layer_selection import needs_selection, select_layers
from .loop import fit
from .optim import optimizer_for
from .state import Progress, seed_everything
from .validation import Selection, eval_record

logger = logging.getLogger(__name__)

#: Environment variable naming a folder where every rank writes a hash of its final parameters and mask
#: (used by the multi-process test to show that the ranks agree).
STATE_HASH_ENV = "MASM_DEBUG_STATE_HASH_DIR"


@dataclass
class TrainResult:
    """What a finished run produced."""

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path
    global_step: int
    epochs_completed: int
    best_metric: float | None  # frame AUC the best checkpoint was selected on (None: no selection data)
    best_step: int | None
    select_on: str
    val: dict[str, Any] | None = None  # the last validation: {dataset: evaluate_scores result}
    # evaluate_detector result of the best checkpoint on the test sets (rank 0; None on the other ranks)
    test: dict[str, Any] | None = None
    metrics_path: Path | None = None
    frames_failed: int = 0  # training samples that failed to load or forge, over all ranks and resumes
    resumed_from: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DistributedFailure(MasmError):
    """A rank of a multi-process run failed; every rank stops with its message (exit status 1)."""

    exit_code = 1


class Run:
    """State of one training run: what the loop (:mod:`.loop`) reads and advances."""

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
        self._build()

    def _build(self) -> None:
        cfg, env = self.config, self.env
        configure_matmul_precision(env.device, cfg.tf32)
        if needs_selection(cfg):  # FMSD: choose the layers to adapt first (a resumed run has them)
            select_layers(cfg, self.data.train.records, env, self.log, self.out if env.is_main else None)
        with dist_utils.local_main_first(env):  # one SVD per weight per machine, then read from the cache
            self.detector: Detector = create_detector(
                cfg.model.backbone, cfg.model.method, preprocessing=cfg.model.preprocessing, seed=cfg.seed
            )
        cfg.model = self.detector.config  # resolved: preprocessing filled in from the backbone
        self.detector.to(env.device).train()
        self.masm_cfg = cfg.model.method.masm_config
        self.layer_groups = layer_groups(self.detector)  # found once, not by a module walk every step
        self.controller = None
        if self.masm_cfg is not None and self.masm_cfg.mask.enabled:
            self.controller = SelectiveMaskController(
                self.detector, self.masm_cfg.mask, self.out / "masks.jsonl"
            )
        self.optimizer = optimizer_for(cfg, self.detector.trainable_parameters())
        self.health = StepHealth(self.detector, env.device, env.distributed)
        self.model: torch.nn.Module = self.detector
        if env.distributed:
            # built on a side stream when the step is to be captured, as PyTorch's recipe for DDP in a
            # CUDA graph asks
            with cuda_graph.side_stream(cfg.cuda_graph and env.device.type == "cuda"):
                self.model = torch.nn.parallel.DistributedDataParallel(
                    self.detector,
                    device_ids=[env.device.index] if env.device.type == "cuda" else None,
                    broadcast_buffers=False,  # frozen buffers (W_sem) are identical everywhere; do not resend
                )
        if cfg.compile:  # after DDP, as PyTorch documents: DDP's buckets then split the compiled graph
            self.model = torch.compile(self.model)
        self.plan = build_train_loader(
            cfg, self.data.train.records, self.detector.preprocessing, env.rank, env.world_size, env.device
        )
        self.failures = FailureLedger(cfg.data.max_failed_share, len(self.data.train.records))
        self.captured = cuda_graph.make_captured_step(self) if cfg.cuda_graph else None

    # checkpoints -------------------------------------------------------------------------------------------
    def _info(self, kind: str) -> dict[str, Any]:
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
        self.checkpoints.save_last(self.detector, self.optimizer, self.controller, state, self._info("last"))

    def resume(self, found: Path | None) -> None:
        """Continue from ``last`` (recovered from ``found``); from step 0 when the run has none yet."""
        if found is None:
            logger.info("%s has no checkpoint yet: starting the run from its first step", self.out)
            if self.env.is_main:  # the layer selection, made when the run started, is not made again
                truncate_jsonl(self.metrics_path, lambda r: r.get("kind") == "select")
                (self.out / "masks.jsonl").unlink(missing_ok=True)
            return
        restored = self.checkpoints.restore(
            self.detector, self.optimizer, self.controller, self.env.world_size, self.config.data.batch_size
        )
        self.progress = restored.progress
        self.last_eval_step = restored.last_eval_step
        self.failures.load_state(restored.failures)
        if self.progress.best_rule is not None and self.progress.best_rule != self.selection.rule:
            archived = self.checkpoints.archive_best(self.progress.global_step)
            logger.warning(
                "best was selected under another rule (%s, now %s): kept as %s; selection starts again",
                self.progress.best_rule,
                self.selection.rule,
                archived,
            )
            self.progress.best_metric = self.progress.best_step = self.progress.best_rule = None
        if self.env.is_main:
            step = self.progress.global_step
            truncate_jsonl(self.metrics_path, lambda r: r.get("step", 0) <= step)
            truncate_jsonl(self.out / "masks.jsonl", lambda r: r.get("step", 0) < step)
        logger.info(
            "resumed from %s at step %d (epoch %d)", found, self.progress.global_step, self.progress.epoch + 1
        )

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
            self.checkpoints.save_best(self.detector, self._info("best"))
        return metric

    def finish(self) -> None:
        """Final validation if the last step was not validated, then the final ``last`` and ``best``."""
        if self.selection.sets and self.last_eval_step != self.progress.global_step:
            self.validate()
        self.progress.finished = True
        if not self.selection.sets:  # nothing to select on: best is the final model (rule "none")
            self.progress.best_rule = self.selection.rule
            self.progress.best_step = self.progress.global_step
            self.checkpoints.save_best(self.detector, self._info("best"))
        self.save_last()
        dist_utils.barrier(self.env)
        _dump_state_hash(self)

    # logging -----------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def epoch_float(self) -> float:
        return round(self.progress.epoch + self.progress.step_in_epoch / max(1, self.plan.steps_per_epoch), 4)

    def progress_bar(self, epoch: int):
        from ..evaluation.evaluate import _progress_bar

        bar = _progress_bar(
            self.plan.steps_per_epoch, f"epoch {epoch + 1}/{self.config.epochs}", self.show_progress
        )
        if self.progress.step_in_epoch and hasattr(bar, "n"):
            bar.update(self.progress.step_in_epoch)
        return bar


def parameter_hash(detector: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(detector.trainable_state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _dump_state_hash(run: Run) -> None:
    folder = os.environ.get(STATE_HASH_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {
        "rank": run.env.rank,
        "world_size": run.env.world_size,
        "params": parameter_hash(run.detector),
        "mask": run.controller.mask.int().tolist() if run.controller is not None else None,
        "selected_layers": run.config.model.method.masm.select.layers,
        "global_step": run.progress.global_step,
    }
    (Path(folder) / f"rank{run.env.rank}.json").write_text(json.dumps(record))


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    *,
    progress: bool = True,
    train_data: DataArg = None,
    val_data: DataArg = None,
    test_data: Sequence[DataArg] | None = None,
    on_step: Callable[[Progress], None] | None = None,
    overwrite: bool = False,
    resume_changed: bool = False,
) -> TrainResult:
    """Train a detector as ``config`` says, writing the run to ``out_dir``; see the module doc.

    ``resume=True`` continues the run in ``out_dir`` from its newest complete checkpoint and reaches the
    same parameters as an uninterrupted run; ``config`` must then be the run's own (see
    :mod:`masm.training.run_folder`; ``resume_changed=True`` accepts and records differences). Without
    ``resume`` a folder holding a run is refused unless ``overwrite``. ``train_data``, ``val_data`` and
    ``test_data`` replace the config's specs with in-memory data (a spec string, a :class:`FrameIndex` or a
    list of :class:`FrameRecord`); it is recorded under ``out_dir/data`` so the saved config trains again.
    ``on_step(progress)`` is called after every optimizer step (tests use it to interrupt a run). Launch
    under ``torchrun`` for DDP: an error on one rank then stops every rank with it
    (:class:`DistributedFailure`).
    """
    config = copy.deepcopy(config)
    out = Path(out_dir)
    env = dist_utils.setup(config.device, config.dist_timeout_s, graph_capture=config.cuda_graph)
    failed = True
    try:
        in_memory = (train_data, val_data, test_data)
        result = _train(config, out, resume, env, progress, in_memory, on_step, overwrite, resume_changed)
        failed = False
        return result
    except BaseException as err:
        if not env.distributed:
            raise
        first = dist_utils.report_failure(env, err)
        message = f"rank {env.rank} stops because {first}" if first else f"rank {env.rank} failed: {err}"
        raise DistributedFailure(message) from err
    finally:
        dist_utils.cleanup(env, failed=failed)


def _train(config, out, resume, env, progress, in_memory, on_step, overwrite, resume_changed) -> TrainResult:
    written = record_in_memory_data(config, out, *in_memory)
    found = None
    if resume:
        if not run_folder.holds_run(out):
            raise CheckpointError(f"{out} holds no run to resume; start it without --resume")
        found = RunCheckpoints(out, env).recover()  # wherever a kill left the newest complete copy
        run_folder.check_recorded_data(written, resume_changed)
        config, changes = run_folder.resume_config(out, config, resume_changed)
        run_folder.check_resume_model(config, out / "checkpoints" / "last")
        if env.is_main:
            run_folder.record_changes(out, changes, _checkpoint_step(out))
    elif env.is_main:
        run_folder.prepare_fresh(out, overwrite)
    dist_utils.barrier(env)
    seed_everything(config.seed)
    data = open_run_data(config, *in_memory)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_recorded_data(written)
        for index, role in [(data.train, "train"), (data.val, "val"), *((t, "test") for t in data.tests)]:
            if index is not None:
                logger.info("%s: %s", role, index.describe())
    dist_utils.barrier(env)
    run = Run(config, out, env, data, progress, on_step)
    if env.is_main:
        run_folder.write_config(out, config)
    if resume:
        run.resume(found)
    fit(run)
    run.finish()
    test = _evaluate_best(run, config, progress) if data.tests else None
    dist_utils.barrier(env)
    return TrainResult(
        out_dir=out,
        last_checkpoint=run.checkpoints.last_dir,
        best_checkpoint=run.checkpoints.best_dir,
        global_step=run.progress.global_step,
        epochs_completed=run.progress.epoch,
        best_metric=run.progress.best_metric,
        best_step=run.progress.best_step,
        select_on=config.select_on,
        val=run.last_val,
        test=test,
        metrics_path=run.metrics_path,
        frames_failed=run.failures.failed,
        resumed_from=found,
    )


def _checkpoint_step(out: Path) -> int | None:
    state = out / "checkpoints" / "last" / "trainer_state.json"
    try:
        return json.loads(state.read_text())["progress"]["global_step"]
    except (OSError, ValueError, KeyError):
        return None


def _evaluate_best(run: Run, config: TrainConfig, progress: bool) -> dict[str, Any]:
    """Every rank scores its share of the test frames with the best model; rank 0 writes the report."""
    env = run.env
    best = load_checkpoint(run.checkpoints.best_dir, device=env.device, merge=True)
    return evaluate_detector(
        best,
        run.data.tests,
        out_dir=run.out / "eval",
        frames=config.data.frames_test,
        batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        seed=config.seed,
        device=env.device,
        precision=config.precision,
        progress=progress,
        shard=Shard(env.rank, env.world_size),
        meta={
            "checkpoint": str(run.checkpoints.best_dir),
            "seed": config.seed,
            "select_on": config.select_on,
            "best_step": run.progress.best_step,
            "config": config_to_dict(config),
        },
    )

"""``masm train``: one device or many (``torchrun``), resumable at any step, whatever killed it.

The trainer never branches on the fine-tuning method: it builds the detector with
:func:`~masm.models.create_detector`, trains its trainable parameters with Adam/AdamW on
:func:`~masm.method.total_loss`, and runs the :class:`~masm.method.SelectiveMaskController` when the method
has a mask. Here the run is built, resumed and driven; the parts live in their own modules: the run's
state (:mod:`.run_state`), the data (:mod:`.data`), the optimizer and schedule (:mod:`.optim`), the loop
(:mod:`.loop`), validation (:mod:`.validation`), checkpoints (:mod:`.checkpoints`), the run folder and
resume's config (:mod:`.run_folder`), failed samples (:mod:`.failures`). Outputs of a run in ``out_dir``::

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
from ..evaluation.scoring import Shard
from ..explain.evaluate import evaluate_detector
from ..method import SelectiveMaskController, layer_groups
from ..models.factory import create_detector, load_checkpoint
from ..precision import configure_matmul_precision
from . import cuda_graph, run_folder
from . import distributed as dist_utils
from .checkpoints import RunCheckpoints, truncate_jsonl
from .config import TrainConfig, config_to_dict
from .data import DataArg, RunData, build_train_loader, open_run_data, record_in_memory_data
from .failures import FailureLedger
from .final_calibration import calibrate_best
from .health import StepHealth
from .layer_selection import needs_selection, select_layers
from .loop import fit
from .optim import optimizer_for
from .run_state import Run
from .state import Progress, seed_everything

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
    # the best checkpoint's calibration on the validation split: {"calibration", "notes", "report"} (rank 0)
    calibration: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DistributedFailure(MasmError):
    """A rank of a multi-process run failed; every rank stops with its message (exit status 1)."""

    exit_code = 1


def build_run(config, out_dir: Path, env, data: RunData, progress_bar: bool, on_step) -> Run:
    """A :class:`Run` of ``config`` with its parts built: FMSD's layer selection first (when asked), then
    the detector, mask controller, optimizer, health check, DDP / compiled model, loader and captured step."""
    run = Run(config, out_dir, env, data, progress_bar, on_step)
    configure_matmul_precision(env.device, config.tf32)
    if needs_selection(config):  # FMSD: choose the layers to adapt first (a resumed run has them)
        select_layers(config, data.train.records, env, run.log, out_dir if env.is_main else None)
    with dist_utils.local_main_first(env):  # one SVD per weight per machine, then read from the cache
        run.detector = create_detector(
            config.model.backbone,
            config.model.method,
            preprocessing=config.model.preprocessing,
            seed=config.seed,
            head_logits=config.model.head_logits,
        )
    config.model = run.detector.config  # resolved: preprocessing filled in from the backbone
    run.detector.to(env.device).train()
    run.masm_cfg = config.model.method.masm_config
    run.layer_groups = layer_groups(run.detector)  # found once, not by a module walk every step
    run.controller = None
    if run.masm_cfg is not None and run.masm_cfg.mask.enabled:
        run.controller = SelectiveMaskController(run.detector, run.masm_cfg.mask, out_dir / "masks.jsonl")
    run.optimizer = optimizer_for(config, run.detector.trainable_parameters())
    run.health = StepHealth(run.detector, env.device, env.distributed)
    run.model = run.detector
    if env.distributed:
        # built on a side stream when the step is to be captured, as PyTorch's recipe for DDP in a
        # CUDA graph asks
        with cuda_graph.side_stream(config.cuda_graph and env.device.type == "cuda"):
            run.model = torch.nn.parallel.DistributedDataParallel(
                run.detector,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False,  # frozen buffers (W_sem) are identical everywhere; do not resend
            )
    if config.compile:  # after DDP, as PyTorch documents: DDP's buckets then split the compiled graph
        run.model = torch.compile(run.model)
    run.plan = build_train_loader(
        config, data.train.records, run.detector.preprocessing, env.rank, env.world_size, env.device
    )
    run.failures = FailureLedger(config.data.max_failed_share, len(data.train.records))
    run.captured = cuda_graph.make_captured_step(run) if config.cuda_graph else None
    return run


def _resume(run: Run, found: Path | None) -> None:
    """Continue ``run`` from ``last`` (recovered from ``found``); from step 0 when the run has none yet."""
    if found is None:
        logger.info("%s has no checkpoint yet: starting the run from its first step", run.out)
        if run.env.is_main:  # the layer selection, made when the run started, is not made again
            truncate_jsonl(run.metrics_path, lambda r: r.get("kind") == "select")
            (run.out / "masks.jsonl").unlink(missing_ok=True)
        return
    restored = run.checkpoints.restore(
        run.detector, run.optimizer, run.controller, run.env.world_size, run.config.data.batch_size
    )
    run.progress = restored.progress
    run.last_eval_step = restored.last_eval_step
    run.failures.load_state(restored.failures)
    if run.progress.best_rule is not None and run.progress.best_rule != run.selection.rule:
        archived = run.checkpoints.archive_best(run.progress.global_step)
        logger.warning(
            "best was selected under another rule (%s, now %s): kept as %s; selection starts again",
            run.progress.best_rule,
            run.selection.rule,
            archived,
        )
        run.progress.best_metric = run.progress.best_step = run.progress.best_rule = None
    if run.env.is_main:
        step = run.progress.global_step
        truncate_jsonl(run.metrics_path, lambda r: r.get("step", 0) <= step)
        truncate_jsonl(run.out / "masks.jsonl", lambda r: r.get("step", 0) < step)
    logger.info(
        "resumed from %s at step %d (epoch %d)", found, run.progress.global_step, run.progress.epoch + 1
    )


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
    run = build_run(config, out, env, data, progress, on_step)
    if env.is_main:
        run_folder.write_config(out, config)
    if resume:
        _resume(run, found)
    fit(run)
    run.finish()
    _dump_state_hash(run)
    calibrated = calibrate_best(run, progress)
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
        calibration=calibrated,
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

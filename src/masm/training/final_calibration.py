"""The trainer's last step before testing: calibrate the best checkpoint on the validation split.

Every rank scores its share of the validation frames with the best model; rank 0 fits the temperature and
the operating points (:func:`masm.evaluation.calibrate.calibrate_detector`), writes the report to
``OUT/calibration/`` and stores the calibration in ``checkpoints/best`` (weights untouched), so that the
test evaluation, ``masm detect`` and ``masm serve`` use it. A validation split too small for an operating
point (or with one class) costs that point or the calibration, with a warning, never the finished run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import MasmError
from ..evaluation.calibrate import calibrate_detector
from ..evaluation.scoring import Shard
from ..models.checkpoint import write_calibration
from ..models.factory import load_checkpoint
from . import distributed as dist_utils

logger = logging.getLogger(__name__)


def calibrate_best(run: Any, progress: bool = False) -> dict[str, Any] | None:
    """Calibrate ``run``'s best checkpoint on its validation split; returns ``{"calibration", "notes",
    "report"}`` on rank 0 (None on the other ranks, and when there is nothing to calibrate on)."""
    config, env = run.config, run.env
    val = run.data.val
    if not config.calibrate or val is None or config.select_on != "val":
        return None
    best = load_checkpoint(run.checkpoints.best_dir, device=env.device, merge=True)
    out = run.out / "calibration"
    try:
        fitted = calibrate_detector(
            best,
            val,
            out_dir=out if env.is_main else None,
            lenient=True,
            batch_size=config.data.eval_batch_size,
            num_workers=config.data.num_workers,
            device=env.device,
            precision=config.precision,
            progress=progress,
            shard=Shard(env.rank, env.world_size),
        )
    except MasmError as err:  # e.g. a validation split of one class: the run itself is fine
        logger.warning("no calibration stored: %s", err)
        fitted = None
    result = None
    if env.is_main and fitted is not None:
        calibration, notes = fitted
        write_calibration(run.checkpoints.best_dir, calibration)
        for note in notes:
            logger.warning("calibration: %s", note)
        logger.info(
            "calibrated on %s: temperature %.4f, operating points %s (default %s); report in %s",
            val.name,
            calibration.temperature,
            ", ".join(calibration.names()) or "none",
            calibration.default,
            out,
        )
        result = {"calibration": calibration, "notes": notes, "report": Path(out) / "calibration.json"}
    dist_utils.barrier(env)  # the test evaluation reads the calibrated checkpoint
    return result

"""The run's checkpoints: ``last`` (everything a resume needs) and ``best`` (the selected model).

Writes go through :func:`masm.models.checkpoint.save_checkpoint`, atomic and durable, so at every
instant a complete, verified copy of each exists; a resume first recovers the newest complete ``last``
wherever a kill left it (``last``, ``last.tmp`` or ``last.old``) and says which it took. Only rank 0
writes; every rank reads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.checkpoint import (
    load_extra_tensors,
    read_checkpoint_config,
    recover_checkpoint,
    save_checkpoint,
)
from ..models.detector import Detector
from . import distributed as dist_utils
from .state import Progress, flatten_optimizer, rng_state, set_rng_state, unflatten_optimizer

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class ResumedState:
    """What a resume restores beyond the tensors it loads in place."""

    progress: Progress
    last_eval_step: int
    failures: dict[str, int]
    source: Path


class RunCheckpoints:
    def __init__(self, out: Path, env: dist_utils.DistEnv):
        self.env = env
        self.last_dir = out / "checkpoints" / "last"
        self.best_dir = out / "checkpoints" / "best"
        self.saved_last = False

    def save_last(
        self,
        detector: Detector,
        optimizer: torch.optim.Optimizer,
        controller,
        state: dict[str, Any],
        info: dict[str, Any],
    ) -> None:
        """Write ``last``: the model, the optimizer, the mask, every RNG and ``state`` (progress, ...)."""
        opt_tensors, opt_skeleton = flatten_optimizer(optimizer)
        rng_tensors, rng_meta = rng_state()  # every rank: keeps the RNGs in step
        tensors = {"optimizer": opt_tensors, "rng": rng_tensors}
        if controller is not None:
            tensors["mask"] = controller.state_dict()
        state = {**state, "optimizer": opt_skeleton, "rng": rng_meta}
        if self.env.is_main:
            save_checkpoint(
                detector, self.last_dir, extra_tensors=tensors, extra_json={"trainer_state": state}, info=info
            )
        self.saved_last = True
        dist_utils.barrier(self.env)

    def save_best(self, detector: Detector, info: dict[str, Any]) -> None:
        if self.env.is_main:
            save_checkpoint(detector, self.best_dir, info=info)
        dist_utils.barrier(self.env)

    def recover(self) -> Path | None:
        """Put the newest complete ``last`` (and ``best``) in place after a kill; the ``last`` found."""
        found = None
        if self.env.is_main:
            recover_checkpoint(self.best_dir)
            found = recover_checkpoint(self.last_dir)
            if found is not None and found != self.last_dir:
                logger.warning("a checkpoint write was cut short: resuming from the complete copy %s", found)
        found = dist_utils.broadcast_object(self.env, str(found) if found else None)
        return Path(found) if found else None

    def restore(self, detector: Detector, optimizer, controller, world_size: int, batch_size: int):
        """Load ``last`` into the model, optimizer and mask, and the RNGs; returns the rest of its state."""
        last = self.last_dir
        ckpt = read_checkpoint_config(last)
        if ckpt.get("backbone_fingerprint") and ckpt["backbone_fingerprint"] != detector.backbone_fingerprint:
            raise CheckpointError(f"{last}: trained on other backbone weights (fingerprint mismatch)")
        state_path = last / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"{last}: no {STATE_FILE}, not a resumable checkpoint")
        state = json.loads(state_path.read_text())
        if state.get("world_size") != world_size or state.get("batch_size") != batch_size:
            raise CheckpointError(
                f"{last}: written with {state.get('world_size')} processes and batch size "
                f"{state.get('batch_size')}; resume with the same (now {world_size}, {batch_size}) to "
                "reproduce the data order"
            )
        _load_model(detector, last)
        saved = unflatten_optimizer(load_extra_tensors(last, "optimizer"), state["optimizer"])
        for loaded, current in zip(saved["param_groups"], optimizer.param_groups):
            # the kernel is this code's choice (fused since issue 17), not the run's: an older run resumes
            loaded.update({k: current[k] for k in ("fused", "foreach", "capturable") if k in current})
            if torch.is_tensor(current["lr"]):  # capturable: the learning rate stays a device tensor
                loaded["lr"] = current["lr"].clone().fill_(float(loaded["lr"]))
        try:
            optimizer.load_state_dict(regroup_optimizer_state(saved, detector, optimizer))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{last / 'optimizer.safetensors'}: does not fit this run's optimizer ({err})"
            ) from None
        if controller is not None:
            controller.load_state_dict(load_extra_tensors(last, "mask"))
        set_rng_state(load_extra_tensors(last, "rng"), state["rng"])
        self.saved_last = True
        return ResumedState(
            progress=Progress.from_json(state["progress"]),
            last_eval_step=state.get("last_eval_step", -1),
            failures=state.get("failures", {}),
            source=last,
        )

    def archive_best(self, step: int) -> Path | None:
        """Move ``best`` aside (its selection rule no longer applies); rank 0 moves, all return the path."""
        target = self.best_dir.with_name(f"best-until-step-{step}")
        if self.env.is_main and self.best_dir.is_dir():
            os.replace(self.best_dir, target)
        dist_utils.barrier(self.env)
        return target


def regroup_optimizer_state(saved: dict, detector: Detector, optimizer) -> dict:
    """Optimizer state written before same-shape MASM layers shared one tensor per factor (three entries per
    layer: its U, s and V, in model order, then the rest) as this optimizer's (three per layer group, then
    the rest): each group's moments are the layers' stacked, its step count the largest of theirs (a layer
    the mask paused whole had skipped steps). Other state is returned as it is."""
    from ..method import masm_layers
    from ..method.groups import FACTORS
    from ..method.layer import layer_groups

    old = saved["param_groups"][0]["params"]
    new = optimizer.param_groups[0]["params"]
    layers = [layer for _, layer in masm_layers(detector)]
    groups = layer_groups(detector)
    if len(saved["param_groups"]) != 1 or len(old) == len(new) or not layers:
        return saved
    rest = len(new) - 3 * len(groups)
    if len(old) != 3 * len(layers) + rest:
        return saved  # not that layout: load_state_dict says what does not fit
    position = {(id(layer.group), layer.index): i for i, layer in enumerate(layers)}
    entries = saved["state"]
    regrouped: dict[int, dict] = {}
    for g, group in enumerate(groups):
        for f, name in enumerate(FACTORS):
            rows = [entries.get(old[3 * position[(id(group), row)] + f], {}) for row in range(len(group))]
            param = getattr(group, name)
            if not any(rows):
                continue
            merged = {}
            for key in {k for row in rows for k in row}:
                values = [row.get(key) for row in rows]
                if key == "step":
                    merged[key] = max((v for v in values if v is not None), key=float).clone()
                else:
                    merged[key] = torch.stack(
                        [torch.zeros_like(param[0]) if v is None else v.to(param) for v in values]
                    )
            regrouped[new[3 * g + f]] = merged
    for k in range(rest):
        if old[3 * len(layers) + k] in entries:
            regrouped[new[3 * len(groups) + k]] = entries[old[3 * len(layers) + k]]
    groups_state = [{**saved["param_groups"][0], "params": list(new)}]
    return {"state": regrouped, "param_groups": groups_state}


def _load_model(detector: Detector, last: Path) -> None:
    weights = load_extra_tensors(last, "model")
    missing, unexpected = detector.load_state_dict(weights, strict=False)
    if unexpected:
        raise CheckpointError(f"{last}: unexpected tensor {unexpected[0]!r} for this model")
    trainable = {name for name, tensor in detector.trainable_state().items() if tensor.requires_grad}
    missing_trainable = [name for name in missing if name in trainable]
    if missing_trainable:
        raise CheckpointError(
            f"{last / 'model.safetensors'}: trainable weight {missing_trainable[0]!r} is missing "
            f"({len(missing_trainable)} of {len(trainable)} missing); the checkpoint is incomplete"
        )


def truncate_jsonl(path: Path, keep) -> None:
    """Drop records a resumed run will write again (those after the checkpoint it resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    path.write_text("".join(line + "\n" for line in kept))

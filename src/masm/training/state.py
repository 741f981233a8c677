"""Everything a run needs to resume exactly: optimizer, RNGs and the position in the data.

Checkpoints are safetensors + JSON (never pickles), so the optimizer state dict is flattened into named
tensors (``state.<param index>.<key>``) plus a JSON skeleton of its structure, and RNG states become a
uint8 tensor (torch) and JSON (numpy, python).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError


@dataclass
class Progress:
    """Where a run is: ``epoch`` (0-based) and optimizer steps done in it, total steps, best so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_rule: str | None = None  # how best was selected (select_on and sets): compared only under one rule
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and python in a DataLoader worker from the per-worker torch seed the loader derived."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# -- RNG state -------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    meta = {
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    n = meta["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# -- optimizer state -------------------------------------------------------------------------------------
def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as named tensors + a JSON skeleton (non-tensor values kept in JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    # a capturable optimizer's learning rate is a device tensor: JSON keeps its value
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    skeleton: dict[str, Any] = {"param_groups": groups, "state": {}}
    for idx, entries in sd["state"].items():
        slot: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{idx}.{key}"
                tensors[name] = value
                slot[key] = {"tensor": name}
            else:
                slot[key] = {"value": value}
        skeleton["state"][str(idx)] = slot
    return tensors, skeleton


def unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    try:
        state = {
            int(idx): {
                key: (tensors[spec["tensor"]] if "tensor" in spec else spec["value"])
                for key, spec in slot.items()
            }
            for idx, slot in skeleton["state"].items()
        }
        groups = skeleton["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"optimizer state is incomplete or malformed ({err})") from None
    return {"state": state, "param_groups": groups}

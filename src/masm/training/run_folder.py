"""The run folder: what a fresh run may overwrite, and which config a resumed run continues with.

A run folder holds ``config.yaml`` (the resolved config), logs and checkpoints. A fresh run refuses a
folder that holds an earlier run unless told to overwrite it. A resumed run continues with the config the
run saved; a config or ``--set`` that changes anything but the run's length or its logging is refused with
the list of differences, unless the caller allows changes, and then the change is recorded in
``changes.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import merge_dicts, parse_overrides
from ..errors import CheckpointError, ConfigError, MasmError
from ..models.checkpoint import read_checkpoint_config
from .config import TrainConfig, config_to_dict, load_train_config, train_config_from_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "changes.jsonl"
#: What a run writes into its folder (``--overwrite`` removes these and nothing else).
RUN_ARTIFACTS = (
    CONFIG_FILE,
    "metrics.jsonl",
    "masks.jsonl",
    "select.png",
    CHANGES_FILE,
    "checkpoints",
    "eval",
    "data",
)
#: Filled in when the run started (FMSD's layer selection), as ``model.preprocessing`` is from the backbone.
SELECTED_LAYERS = "model.method.masm.select.layers"
#: Keys a resume may change without being told: the run's length, its logging, and settings that cannot
#: change what it computes (samples are seeded per index, so the worker count does not matter).
RESUMABLE_KEYS = frozenset({"epochs", "max_steps", "log_every", "dist_timeout_s", "data.num_workers"})


def holds_run(out: Path) -> bool:
    return (out / CONFIG_FILE).is_file() or (out / "checkpoints").is_dir()


def prepare_fresh(out: Path, overwrite: bool) -> None:
    """Refuse a folder with an earlier run in it, or with ``overwrite`` remove that run's files."""
    if not holds_run(out):
        return
    if not overwrite:
        raise MasmError(
            f"{out} already holds a run; continue it with --resume, or pass --overwrite to start it again"
        )
    logger.warning("overwriting the run in %s", out)
    for name in RUN_ARTIFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def saved_config(out: Path) -> TrainConfig:
    """The config ``out`` was run with; a clear error when ``out`` holds no run to resume."""
    path = out / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{out} holds no run to resume (no {CONFIG_FILE}); start it without --resume")
    return load_train_config(path)


def config_from_run(out: Path, overrides: list[str] | None = None) -> TrainConfig:
    """The run's saved config with ``--set`` overrides on top (``masm train --resume --out RUN``)."""
    saved = config_to_dict(saved_config(out))
    return train_config_from_dict(merge_dicts(saved, parse_overrides(overrides or [])))


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, wanted value)]`` for every setting that differs."""
    a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(wanted))
    if wanted.model.preprocessing is None:  # resolved from the backbone when the run started
        a = {k: v for k, v in a.items() if not k.startswith("model.preprocessing")}
        b = {k: v for k, v in b.items() if not k.startswith("model.preprocessing")}
    if wanted.model.method.masm.select.layers is None:  # chosen when the run started
        a.pop(SELECTED_LAYERS, None)
        b.pop(SELECTED_LAYERS, None)
    if wanted.model.head_logits is None:  # resolved (2, or the starting checkpoint's) when the run started
        a.pop("model.head_logits", None)
        b.pop("model.head_logits", None)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def resume_config(out: Path, config: TrainConfig, allow_changes: bool):
    """``(config, differences)``: the config a resumed run continues with, checked against the run's own.

    Differences outside :data:`RESUMABLE_KEYS` are a :class:`ConfigError` listing them unless
    ``allow_changes``; :func:`record_changes` records them once the resume is under way.
    """
    saved = saved_config(out)
    changes = config_differences(saved, config)
    refused = [c for c in changes if c[0] not in RESUMABLE_KEYS]
    if refused and not allow_changes:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError(
            f"--resume: the config differs from the run's own ({out / CONFIG_FILE}): {listed}. Resume "
            "without a config (or with the same one) to continue the run, or pass --resume-changed to "
            "continue with these changes"
        )
    if config.model.preprocessing is None:
        config.model.preprocessing = saved.model.preprocessing
    if config.model.head_logits is None:
        config.model.head_logits = saved.model.head_logits
    if config.model.method.masm.select.layers is None:  # the layers the run selected: no second selection
        config.model.method.masm.select.layers = saved.model.method.masm.select.layers
    return config, changes


def record_changes(out: Path, changes: list[tuple[str, Any, Any]], step: int | None) -> None:
    """Log the differences a resume continues with and append them to ``changes.jsonl``."""
    if not changes:
        return
    for key, old, new in changes:
        logger.warning("resuming with %s changed: %r -> %r", key, old, new)
    record = {"time": time.time(), "resumed_at_step": step, "changes": changes}
    with (out / CHANGES_FILE).open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def check_recorded_data(written: dict[str, str], allow_changes: bool) -> None:
    """A resumed run given in-memory data: it must be the data the run recorded (or changes allowed)."""
    for path, text in written.items():
        file = Path(path)
        if file.is_file() and file.read_text() != text and not allow_changes:
            raise ConfigError(
                f"--resume: the in-memory data differs from what the run recorded in {file}; pass "
                "--resume-changed (resume_changed=True) to continue with it"
            )


def write_recorded_data(written: dict[str, str]) -> None:
    for path, text in written.items():
        write_atomic(Path(path), text)


def write_config(out: Path, config: TrainConfig) -> None:
    write_atomic(out / CONFIG_FILE, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a kill leaves the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def check_resume_model(config: TrainConfig, last_dir: Path) -> None:
    """Refuse to resume a run whose checkpoint holds another model than the config asks for."""
    if not last_dir.is_dir():
        return
    saved = read_checkpoint_config(last_dir)["model"]
    wanted = config_to_dict(config.model)
    if wanted.get("preprocessing") is None:
        saved = {k: v for k, v in saved.items() if k != "preprocessing"}
        wanted = {k: v for k, v in wanted.items() if k != "preprocessing"}
    if saved.get("backbone") != wanted.get("backbone"):
        raise CheckpointError(
            f"{last_dir}: the checkpoint is of backbone {saved.get('backbone')!r}, the config asks for "
            f"{wanted.get('backbone')!r}"
        )
    if saved != wanted:
        diff = _first_difference(saved, wanted)
        raise CheckpointError(f"{last_dir}: the checkpoint's model config differs from the config at {diff}")


def _first_difference(a: Any, b: Any, where: str = "model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"{where} ({a!r} in the checkpoint, {b!r} in the config)"

"""Checkpoint directories: ``config.json`` + safetensors weights. Loading never unpickles anything.

Layout::

    DIR/config.json         format, model config (backbone, method, preprocessing), backbone HF config,
                            backbone fingerprint, weight kind, sha256 of every data file
    DIR/model.safetensors   ``adapter``: trainable tensors + head (the pretrained backbone is reloaded from
                            its source and verified by fingerprint); ``merged``: the plain backbone with
                            adapters folded in, plus the head (loadable without the MASM code path)
    DIR/<extra>.safetensors optional extra tensor files (the trainer's optimizer / mask / RNG state)
    DIR/<extra>.json        optional extra JSON files

Writes are atomic and durable on POSIX file systems: a checkpoint is written to ``DIR.tmp``, every file and
the folder are fsynced, then ``DIR`` is moved to ``DIR.old``, ``DIR.tmp`` to ``DIR``, and ``DIR.old`` removed.
A kill at any instant leaves at least one complete, checksummed copy among ``DIR.tmp``, ``DIR`` and
``DIR.old``; :func:`recover_checkpoint` finds the newest of them and puts it back at ``DIR`` (the trainer
calls it before resuming and before every write, so the only complete copy is never deleted).

This module reads and writes the files; :func:`~masm.models.load_checkpoint`
(:mod:`~masm.models.factory`) rebuilds the detector, which for adapter weights means its backbone again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import to_dict
from ..errors import CheckpointError, MasmError
from .calibration import Calibration
from .detector import Detector, ModelConfig
from .families import family_for_config
from .fingerprint import canonical_key

FORMAT = "masm-detector"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_checkpoint(
    detector: Detector,
    directory: str | Path,
    *,
    merged: bool = False,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_json: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``detector`` to ``directory`` atomically and return the path.

    ``merged=True`` stores plain backbone weights (adapters folded in) instead of adapter weights; the
    detector itself is left unchanged. ``extra_tensors`` / ``extra_json`` map file stems to content.
    """
    directory = Path(directory)
    recover_checkpoint(directory)  # a copy a kill left in DIR.tmp / DIR.old is the newest: keep it
    tmp = _sibling(directory, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = _merged_state(detector) if merged else _adapter_state(detector)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    files = [WEIGHTS_FILE]
    for stem, content in (extra_tensors or {}).items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / f"{stem}.safetensors")
        )
        files.append(f"{stem}.safetensors")
    for stem, content in (extra_json or {}).items():
        (tmp / f"{stem}.json").write_text(json.dumps(content, indent=1))
        files.append(f"{stem}.json")
    for name in files:
        _fsync_file(tmp / name)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "weights": "merged" if merged or detector.merged else "adapter",
        "model": to_dict(detector.config),
        "backbone_config": detector.backbone.config.to_dict(),
        "backbone_fingerprint": detector.backbone_fingerprint,
        "sha256": {name: file_sha256(tmp / name) for name in files},
        "info": info or {},
    }
    if detector.calibration is not None:
        config["calibration"] = detector.calibration.to_dict()
    # config.json last: its checksums make the folder complete, so it is written only after the data is durable
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    _fsync_file(tmp / CONFIG_FILE)
    _fsync_dir(tmp)
    _switch(tmp, directory)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The validated ``config.json`` of a checkpoint directory, with its data files' checksums verified."""
    return _read_verified(_existing(Path(directory)))


def _read_verified(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a masm checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    for key in ("format", "weights", "model", "backbone_config", "sha256"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key {key!r}")
    if config["format"] != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: unsupported format {config['format']!r} version {config.get('version')!r}"
        )
    for name, expected in config["sha256"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {CONFIG_FILE} but missing")
        if file_sha256(file) != expected:
            raise CheckpointError(f"{file}: checksum mismatch, the file was modified or truncated")
    config["directory"] = str(directory)
    return config


def merged_detector(config: dict[str, Any], model_config: ModelConfig) -> Detector:
    """The detector of a checkpoint holding merged weights (``config``: its :func:`read_checkpoint_config`,
    ``model_config``: the model it records): the backbone built from the stored ``backbone_config``, every
    tensor read from the file; no backbone is looked up."""
    directory = Path(config["directory"])
    backbone_config = config["backbone_config"]
    family = family_for_config(backbone_config, str(directory / CONFIG_FILE))
    try:
        backbone = family.build(backbone_config)
    except MasmError:
        raise
    except Exception as err:  # a config this transformers cannot build
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: cannot build its backbone_config ({err})"
        ) from None
    detector = Detector(
        backbone, model_config, model_config.preprocessing, config.get("backbone_fingerprint", ""), family
    )
    detector.merged = True
    load_tensors(detector, directory / WEIGHTS_FILE, require_all=True)
    return detector


def load_adapter_weights(detector: Detector, config: dict[str, Any]) -> None:
    """Load the adapter weights of a checkpoint (``config``: its :func:`read_checkpoint_config`) into
    ``detector``, rebuilt from the backbone and method the checkpoint records; the backbone must have the
    weights the checkpoint was trained on (same fingerprint)."""
    directory = Path(config["directory"])
    if config.get("backbone_fingerprint") and detector.backbone_fingerprint != config["backbone_fingerprint"]:
        raise CheckpointError(
            f"{directory}: the backbone {detector.config.backbone!r} found here has other weights than the one "
            "this checkpoint was trained on (fingerprint mismatch)"
        )
    load_tensors(detector, directory / WEIGHTS_FILE, require_all=False)


def load_extra_tensors(directory: str | Path, stem: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{stem}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _adapter_state(detector: Detector) -> dict[str, torch.Tensor]:
    """Trainable tensors and the head, under canonical names (the same under transformers 4 and 5)."""
    return {
        # a copy of its own (rows of a group share storage), made once, on the way to the host
        canonical_key(name): tensor.detach().to("cpu", copy=True)
        for name, tensor in detector.trainable_state().items()
    }


def _merged_state(detector: Detector) -> dict[str, torch.Tensor]:
    if detector.merged:
        state = detector.state_dict()
    else:
        import copy

        state = copy.deepcopy(detector).merge().state_dict()
    return {canonical_key(k): v.detach().cpu().contiguous() for k, v in state.items()}


def load_tensors(detector: Detector, path: Path, *, require_all: bool) -> None:
    """Load the file's tensors into ``detector``. Names are compared in canonical form, so a checkpoint
    written under transformers 4 (``vision_model.`` nesting) loads under 5 and the other way round."""
    state = detector.state_dict()
    actual = {canonical_key(k): k for k in state}
    expected = {key: state[name] for key, name in actual.items()}
    required = set(expected) if require_all else set(_adapter_state(detector))
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = {canonical_key(k): k for k in fh.keys()}
            for key, name in sorted(stored.items()):
                if key not in expected:
                    raise CheckpointError(f"{path}: unexpected key {name!r} (not a tensor of this model)")
                shape = tuple(fh.get_slice(name).get_shape())
                if shape != tuple(expected[key].shape):
                    raise CheckpointError(
                        f"{path}: key {name!r} has shape {shape}, the model needs {tuple(expected[key].shape)}"
                    )
            missing = sorted(required - set(stored))
            if missing:
                raise CheckpointError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
            tensors = {actual[key]: fh.get_tensor(name) for key, name in stored.items()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    detector.load_state_dict(tensors, strict=require_all)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def checkpoint_candidates(directory: str | Path) -> list[Path]:
    """The complete (checksum-verified) copies of ``directory`` a write may have left, newest first.

    A write goes ``DIR.tmp`` (newest) → ``DIR`` → ``DIR.old`` (oldest), whatever instant a kill stopped it.
    """
    directory = Path(directory)
    found = []
    for path in (_sibling(directory, ".tmp"), directory, _sibling(directory, ".old")):
        try:
            _read_verified(path)
        except CheckpointError:
            continue
        found.append(path)
    return found


def recover_checkpoint(directory: str | Path) -> Path | None:
    """Put the newest complete copy of ``directory`` at ``directory`` and drop the others.

    Returns the path the copy was found at (``directory`` itself when nothing had to move), or None when no
    complete copy exists (then nothing is deleted except a partial ``DIR.tmp``).
    """
    directory = Path(directory)
    tmp, old = _sibling(directory, ".tmp"), _sibling(directory, ".old")
    if not tmp.exists() and not old.exists():  # the common case: no write was cut short
        return directory if directory.is_dir() else None
    candidates = checkpoint_candidates(directory)
    if not candidates:
        shutil.rmtree(tmp, ignore_errors=True)  # a write cut short; DIR and DIR.old are not ours to judge
        return None
    newest = candidates[0]
    if newest == tmp:
        _switch(tmp, directory)
    elif newest == old:  # DIR is missing or incomplete
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(old, directory)
        _fsync_dir(directory.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return newest


def _existing(directory: Path) -> Path:
    """``directory``, or for a reader (who must not move files) the newest complete copy a kill left."""
    if directory.is_dir():
        return directory
    candidates = checkpoint_candidates(directory)
    if candidates:
        return candidates[0]
    raise CheckpointError(f"checkpoint directory not found: {directory}")


def _switch(tmp: Path, directory: Path) -> None:
    """Make the complete ``tmp`` the checkpoint at ``directory``; a kill at any point leaves one complete."""
    old = _sibling(directory, ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)  # the renames themselves are durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (created or renamed files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_calibration(config: dict[str, Any]) -> Calibration | None:
    """The calibration stored in a checkpoint's (verified) config, or None for one written without it."""
    stored = config.get("calibration")
    if stored is None:
        return None
    return Calibration.from_dict(stored, where=f"{config.get('directory', '?')}/{CONFIG_FILE}: calibration")


def write_calibration(directory: str | Path, calibration: Calibration | None) -> Path:
    """Store ``calibration`` (None: remove it) in the checkpoint's ``config.json``, atomically; the weights
    and their checksums are not touched. Returns the config's path."""
    config = read_checkpoint_config(directory)
    directory = Path(config.pop("directory"))
    if calibration is None:
        config.pop("calibration", None)
    else:
        config["calibration"] = calibration.to_dict()
    path = directory / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(directory)
    return path

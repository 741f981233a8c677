"""Detectors and backbones from what names them: :func:`create_detector` (a backbone name and a method),
:func:`load_checkpoint` (a checkpoint directory) and :func:`open_backbone` (any backbone name).

They live together because they call each other: a masm checkpoint directory may be named as a backbone
(its merged backbone and head start a new detector), and a checkpoint holding adapter weights only
rebuilds its detector from the backbone name it records, which may be such a directory again. Every other
module of :mod:`masm.models` sits below this one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, MasmError
from .backbone_loading import (
    CHECKPOINT_FORMAT,
    LoadedBackbone,
    pretrained_backbone,
    random_backbone,
    read_backbone_config,
)
from .backbones import backbone_location, resolve_backbone
from .checkpoint import load_adapter_weights, merged_detector, read_calibration, read_checkpoint_config
from .detector import Detector, build_detector, model_config_from_dict
from .methods import MethodConfig
from .preprocessing import Preprocessing


def create_detector(
    backbone: str = "clip-vit-l14",
    method: str | MethodConfig = "masm",
    *,
    preprocessing: Preprocessing | None = None,
    cache_dir=None,
    seed: int | None = 0,
    head_logits: int | None = None,
) -> Detector:
    """The one way to build a detector: load the backbone, apply the method, add a fresh head.

    ``backbone`` is a registry name, a hub id, a local ``save_pretrained`` directory of a supported family,
    or a masm checkpoint directory (its merged backbone, preprocessing and head are the starting point).
    ``method`` is a preset name (``masm``, ``fmsd``, ``effort``, ``effort-reg``, ``lora``, ``full``, ``linear``,
    ``ln-tune``) or a :class:`MethodConfig`. ``seed`` makes the head's initialisation reproducible.
    ``head_logits``: 2 (softmax) or 1 (sigmoid); None: 2, or as many as a checkpoint's head started from.
    """
    return build_detector(
        open_backbone(backbone),
        backbone,
        method,
        preprocessing=preprocessing,
        cache_dir=cache_dir,
        seed=seed,
        head_logits=head_logits,
    )


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu", merge: bool = False
) -> Detector:
    """Rebuild the detector stored in ``directory``; ``merge=True`` folds adapters for fast inference."""
    config = read_checkpoint_config(directory)
    directory = Path(config["directory"])
    model_config = model_config_from_dict(config["model"])
    if config["weights"] == "merged":
        detector = merged_detector(config, model_config)
    else:
        try:
            detector = create_detector(
                model_config.backbone,
                model_config.method,
                preprocessing=model_config.preprocessing,
                head_logits=model_config.head_logits,
            )
        except MasmError as err:
            raise CheckpointError(f"{directory}: cannot rebuild its backbone: {err}") from None
        load_adapter_weights(detector, config)
    detector.calibration = read_calibration(config)
    detector.eval().to(device)
    return detector.merge() if merge else detector


def open_backbone(name: str) -> LoadedBackbone:
    """Build the backbone ``name`` (registry name, hub id, local or checkpoint directory), float32, eval."""
    spec = resolve_backbone(name)
    if spec.hub_id is None and spec.local_dir is None:
        return random_backbone(spec)
    source = backbone_location(spec)
    config, local_only = read_backbone_config(spec, source)
    if config.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(source)
    return pretrained_backbone(spec, config, source, local_only)


def load_backbone(name: str) -> nn.Module:
    """The backbone model ``name`` alone (see :func:`open_backbone`)."""
    return open_backbone(name).model


def _from_checkpoint(directory: str) -> LoadedBackbone:
    detector = load_checkpoint(directory, merge=True)
    head = {k: v.detach().clone() for k, v in detector.head.state_dict().items()}
    return LoadedBackbone(detector.backbone, detector.family, detector.preprocessing, head)

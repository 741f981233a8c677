"""Building a backbone by its family: seeded random weights from a registry entry's architecture, or the
weights of a hub model or ``save_pretrained`` directory.

The model class comes from the directory's or hub config's ``model_type`` through
:mod:`~masm.models.families`; an unsupported architecture is an error, never a silently random model of
another class. Hub weights are loaded with ``from_pretrained``, the local HF cache first; when they are not
there, the error says how to get them. Which backbone a name means is :mod:`~masm.models.backbones`'s
business; a masm checkpoint directory named as a backbone is opened by :mod:`~masm.models.factory`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..errors import MasmError
from .backbones import BackboneSpec, backbone_location, resolve_backbone
from .families import FAMILIES, BackboneFamily, family_for_config, family_of
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "masm-detector"  # config.json "format" of a masm checkpoint directory


@dataclass
class LoadedBackbone:
    """A backbone ready for a detector: the model, its family, its input contract and, when it came from a
    masm checkpoint, that detector's head (to initialise the new one)."""

    model: nn.Module
    family: BackboneFamily
    preprocessing: Preprocessing
    head: dict[str, torch.Tensor] | None = None


def random_backbone(spec: BackboneSpec) -> LoadedBackbone:
    """The registry entry ``spec`` (no hub id, no directory) built from its architecture, float32, eval."""
    family = FAMILIES[spec.family]
    # Seeded so that the same named random backbone is the same model every time (checkpoints of
    # tiny test models can then store adapter weights only, like those of pretrained ones).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = family.build(spec.config).eval()
    return LoadedBackbone(model, family, family.preprocessing(model))


def pretrained_backbone(
    spec: BackboneSpec, config: dict[str, Any], source: str, local_only: bool
) -> LoadedBackbone:
    """The weights at ``source`` (hub id or directory, whose config :func:`read_backbone_config` read), built
    by the family its ``model_type`` names, float32, eval."""
    family = family_for_config(config, source)
    model = _from_pretrained(spec, family, config, source, local_only)
    return LoadedBackbone(model, family, family.preprocessing(model))


def build_architecture(name: str) -> tuple[nn.Module, BackboneFamily]:
    """The architecture of ``name`` with random weights, read from the registry or a ``config.json``; no
    weights are loaded or downloaded (for importers whose file holds every weight)."""
    spec = resolve_backbone(name)
    if spec.config:
        family = FAMILIES[spec.family]
        config = spec.config
    else:
        source = backbone_location(spec)
        config, _ = read_backbone_config(spec, source)
        if config.get("format") == CHECKPOINT_FORMAT:
            raise MasmError(f"{source} is a masm checkpoint, not a backbone architecture")
        family = family_for_config(config, source)
        if config.get("model_type") in ("clip", "siglip", "siglip2") and "vision_config" in config:
            config = dict(config["vision_config"], model_type=f"{config['model_type']}_vision_model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return family.build(config).eval(), family


def backbone_preprocessing(model: nn.Module) -> Preprocessing:
    """The family's mean/std at the backbone's native input size."""
    return family_of(model).preprocessing(model)


def _missing_weights_message(spec: BackboneSpec, source: str, err: Exception) -> str:
    if spec.hub_id:
        return (
            f"could not load backbone {spec.name!r} ({source}): its weights are neither in the local Hugging Face "
            f"cache nor downloadable from here ({type(err).__name__}). On a machine with internet run "
            f"huggingface-cli download {source} and copy ~/.cache/huggingface over; or there save the model "
            f"with AutoModel.from_pretrained('{source}').save_pretrained(DIR), copy DIR here and name it as "
            f"the backbone: masm train CONFIG --set model.backbone=DIR (masm bench and masm import effort: "
            f"--backbone DIR)."
        )
    return f"could not load backbone from {source}: {err}"


@contextlib.contextmanager
def _quiet_transformers():
    """No load reports or progress bars from transformers: masm checks what was loaded itself."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def read_backbone_config(spec: BackboneSpec, source: str) -> tuple[dict[str, Any], bool]:
    """The ``config.json`` of a local directory or hub model (the local cache first); and whether the
    weights are to be read from the local cache only."""
    if spec.hub_id is None:
        path = Path(source) / "config.json"
        if not path.is_file():
            raise MasmError(f"{source}: no config.json (not a save_pretrained directory or masm checkpoint)")
        try:
            return json.loads(path.read_text()), True
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MasmError(f"{path}: not valid JSON ({err})") from None
    from transformers import PretrainedConfig

    with _quiet_transformers():
        try:
            return PretrainedConfig.get_config_dict(source, local_files_only=True)[0], True
        except (OSError, ValueError) as local_err:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise MasmError(_missing_weights_message(spec, source, local_err)) from None
            logger.info("%s is not in the local Hugging Face cache; trying to download it", source)
            try:
                return PretrainedConfig.get_config_dict(source)[0], False
            except (OSError, ValueError) as err:
                raise MasmError(_missing_weights_message(spec, source, err)) from None


def _from_pretrained(
    spec: BackboneSpec, family: BackboneFamily, config: dict, source: str, local_only: bool
) -> nn.Module:
    model_type = config.get("model_type") or next(iter(family.model_types))
    cls = family.model_class(model_type)
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(
                source, dtype=torch.float32, local_files_only=local_only, output_loading_info=True
            )
        except (OSError, ValueError) as err:
            raise MasmError(_missing_weights_message(spec, source, err)) from None
        except RuntimeError as err:  # e.g. a size mismatch between config.json and the weights
            raise MasmError(f"could not load backbone from {source}: {str(err).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        first = missing[0] if missing else mismatched[0][0]
        raise MasmError(
            f"{source}: its {family.name} weights are incomplete (key {first!r} is "
            f"{'missing' if missing else 'of the wrong shape'}; {len(missing) + len(mismatched)} in all); "
            "refusing a partly random backbone"
        )
    return model.eval()

"""Backbone registry: the one place that knows which vision transformers exist and how to load them.

A backbone is named by a registry name (``clip-vit-l14``), a Hugging Face hub id, a local directory saved
with ``save_pretrained``, or a masm checkpoint directory (its merged backbone and its head then initialise a
new detector). The model class comes from the directory's or hub config's ``model_type`` through
:mod:`~masm.models.families`; an unsupported architecture is an error, never a silently random model of
another class. Hub weights are loaded with ``from_pretrained``, the local HF cache first; when they are not
there, the error says how to get them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..errors import MasmError
from .families import FAMILIES, BackboneFamily, family_for_config, family_of
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    hub_id: str | None = None  # loaded with from_pretrained
    config: dict[str, Any] = field(default_factory=dict)  # architecture; random init (seeded) without hub_id
    local_dir: str | None = None  # a directory resolved at load time (e.g. the demo's pretrained backbone)
    family: str = "clip"  # see masm.models.families.FAMILIES


_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)
_VIT_B16 = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    projection_dim=512,
)
# The tiny random towers of the unit tests: 4 layers, width 64, 32 px (timm's: 2 layers).
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "clip-vit-l14",
            "CLIP ViT-L/14, 224 px (the paper's backbone)",
            hub_id="openai/clip-vit-large-patch14",
            config=_VIT_L14,  # shapes known: `masm import effort` needs no download
        ),
        BackboneSpec(
            "clip-vit-b16", "CLIP ViT-B/16, 224 px", hub_id="openai/clip-vit-base-patch16", config=_VIT_B16
        ),
        BackboneSpec(
            "siglip-vit-b16",
            "SigLIP ViT-B/16, 224 px",
            hub_id="google/siglip-base-patch16-224",
            family="siglip",
        ),
        BackboneSpec(
            "siglip-so400m",
            "SigLIP So400m/14, 384 px",
            hub_id="google/siglip-so400m-patch14-384",
            family="siglip",
        ),
        BackboneSpec(
            "siglip2-vit-b16",
            "SigLIP 2 ViT-B/16, 224 px (fixed resolution)",
            hub_id="google/siglip2-base-patch16-224",
            family="siglip",
        ),
        BackboneSpec(
            "dinov2-vit-b14", "DINOv2 ViT-B/14, 224 px", hub_id="facebook/dinov2-base", family="dinov2"
        ),
        BackboneSpec(
            "dinov2-vit-l14", "DINOv2 ViT-L/14, 224 px", hub_id="facebook/dinov2-large", family="dinov2"
        ),
        BackboneSpec(
            "dinov3-vit-l16",
            "DINOv3 ViT-L/16 (LVD-1689M), 224 px (gated on the hub: accept its licence first)",
            hub_id="facebook/dinov3-vitl16-pretrain-lvd1689m",
            family="dinov3",
        ),
        BackboneSpec(
            "clip-vit-l14-random", "ViT-L/14 shapes, random init (timing and shape tests)", config=_VIT_L14
        ),
        BackboneSpec(
            "clip-vit-b16-random", "ViT-B/16 shapes, random init (speed benchmark)", config=_VIT_B16
        ),
        BackboneSpec(
            "tiny-clip",
            "4-layer 64-wide CLIP vision tower at 32 px, random init (unit tests)",
            config=dict(_TINY, image_size=32, patch_size=8, projection_dim=32),
        ),
        BackboneSpec(
            "tiny-siglip",
            "4-layer 64-wide SigLIP vision tower at 32 px, random init (unit tests)",
            config=dict(_TINY, model_type="siglip_vision_model", image_size=32, patch_size=8),
            family="siglip",
        ),
        BackboneSpec(
            "tiny-siglip2",
            "4-layer 64-wide SigLIP 2 NaFlex vision tower, 16 patches of 8 px, random init (unit tests)",
            config=dict(_TINY, model_type="siglip2_vision_model", num_patches=16, patch_size=8),
            family="siglip2",
        ),
        BackboneSpec(
            "tiny-dinov2",
            "4-layer 64-wide DINOv2 at 32 px, random init (unit tests)",
            config=dict(_TINY, model_type="dinov2", image_size=32, patch_size=8),
            family="dinov2",
        ),
        BackboneSpec(
            "tiny-dinov3",
            "4-layer 64-wide DINOv3 ViT at 32 px, random init (unit tests)",
            config=dict(_TINY, model_type="dinov3_vit", image_size=32, patch_size=8, num_register_tokens=2),
            family="dinov3",
        ),
        BackboneSpec(
            "tiny-timm-vit",
            "2-layer 64-wide timm ViT at 32 px, random init (unit tests; needs timm)",
            config=dict(
                model_type="timm_wrapper",
                architecture="vit_tiny_patch16_224",
                model_args=dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4),
            ),
            family="timm",
        ),
        BackboneSpec(
            "demo-clip",
            "small CLIP vision tower pretrained on real photo crops (shipped; recipe in masm.demo.pretrain)",
            local_dir="demo-clip",
        ),
    ]
}

CHECKPOINT_FORMAT = "masm-detector"  # config.json "format" of a masm checkpoint directory


@dataclass
class LoadedBackbone:
    """A backbone ready for a detector: the model, its family, its input contract and, when it came from a
    masm checkpoint, that detector's head (to initialise the new one)."""

    model: nn.Module
    family: BackboneFamily
    preprocessing: Preprocessing
    head: dict[str, torch.Tensor] | None = None


def resolve_backbone(name: str) -> BackboneSpec:
    """Registry entry for ``name``; a hub id (``org/model``) or local directory gets an ad-hoc entry."""
    if name in BACKBONES:
        return BACKBONES[name]
    if Path(name).is_dir():
        return BackboneSpec(name, f"local backbone at {name}", local_dir=str(Path(name).resolve()))
    if "/" in name and not Path(name).exists():
        return BackboneSpec(name, f"hub model {name}", hub_id=name)
    known = ", ".join(sorted(BACKBONES))
    raise MasmError(
        f"unknown backbone {name!r}: known names are {known}, or give a hub id or a local directory"
    )


def open_backbone(name: str) -> LoadedBackbone:
    """Build the backbone ``name`` (registry name, hub id, local or checkpoint directory), float32, eval."""
    spec = resolve_backbone(name)
    if spec.hub_id is None and spec.local_dir is None:
        family = FAMILIES[spec.family]
        # Seeded so that the same named random backbone is the same model every time (checkpoints of
        # tiny test models can then store adapter weights only, like those of pretrained ones).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = family.build(spec.config).eval()
        return LoadedBackbone(model, family, family.preprocessing(model))
    source = spec.hub_id or _local_path(spec)
    config, local_only = _read_config(spec, source)
    if config.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(source)
    family = family_for_config(config, source)
    model = _from_pretrained(spec, family, config, source, local_only)
    return LoadedBackbone(model, family, family.preprocessing(model))


def load_backbone(name: str) -> nn.Module:
    """The backbone model ``name`` alone (see :func:`open_backbone`)."""
    return open_backbone(name).model


def build_architecture(name: str) -> tuple[nn.Module, BackboneFamily]:
    """The architecture of ``name`` with random weights, read from the registry or a ``config.json``; no
    weights are loaded or downloaded (for importers whose file holds every weight)."""
    spec = resolve_backbone(name)
    if spec.config:
        family = FAMILIES[spec.family]
        config = spec.config
    else:
        source = spec.hub_id or _local_path(spec)
        config, _ = _read_config(spec, source)
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


# transformers 4 nests CLIP's and SigLIP's vision towers under ``vision_model.`` and names DINOv2's
# projections differently; checkpoints and fingerprints use these canonical (transformers 5) names.
_LEGACY_NAMES = [
    (re.compile(r"(^|\.)vision_model\."), r"\1"),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
]


def canonical_key(name: str) -> str:
    """``name`` of a backbone tensor independent of the transformers version that built the model."""
    for pattern, replacement in _LEGACY_NAMES:
        name = pattern.sub(replacement, name, count=1)
    return name


@torch.no_grad()
def backbone_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of a backbone's weights (a strided sample of every tensor plus its sum).

    Stored in checkpoints that hold adapter weights only, so that loading them onto different pretrained
    weights is an error instead of a silently wrong detector. Tensor names enter in their canonical form,
    so the same weights give the same fingerprint under transformers 4 and 5.
    """
    digest = hashlib.sha256()
    state = {canonical_key(name): tensor for name, tensor in model.state_dict().items()}
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1).float().cpu()
        sample = flat[:: max(1, flat.numel() // 256)]
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
        digest.update(f"{float(flat.double().sum()):.6e}".encode())
    return digest.hexdigest()[:32]


def demo_backbone_dir() -> Path:
    """Where ``masm demo`` keeps its pretrained small backbone (``$MASM_CACHE_DIR/demo-clip``)."""
    root = os.environ.get("MASM_CACHE_DIR") or Path.home() / ".cache" / "masm"
    return Path(root) / "demo-clip"


def packaged_demo_backbone_dir() -> Path:
    """The demo backbone shipped inside the package (made by ``python -m masm.demo.pretrain``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo-clip"


def _local_path(spec: BackboneSpec) -> str:
    if spec.local_dir == "demo-clip":
        # A backbone the user rebuilt with the recipe command wins over the shipped one.
        for path in (demo_backbone_dir(), packaged_demo_backbone_dir()):
            if (path / "config.json").is_file():
                return str(path)
        raise MasmError(
            f"no demo backbone found (neither {demo_backbone_dir()} nor the packaged one); build it with "
            "`python -m masm.demo.pretrain`"
        )
    return str(spec.local_dir)


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


def _read_config(spec: BackboneSpec, source: str) -> tuple[dict[str, Any], bool]:
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


def _from_checkpoint(directory: str) -> LoadedBackbone:
    from .checkpoint import load_checkpoint

    detector = load_checkpoint(directory, merge=True)
    head = {k: v.detach().clone() for k, v in detector.head.state_dict().items()}
    return LoadedBackbone(detector.backbone, detector.family, detector.preprocessing, head)

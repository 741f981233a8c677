"""Backbone registry: the one place that knows which vision transformers exist and how to load them.

A backbone is named by a registry name (``clip-vit-l14``), a Hugging Face hub id, or a local directory
saved with ``save_pretrained``. Hub weights are loaded with ``from_pretrained`` and so work offline from the
local HF cache; when they are not there, the error says how to get them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

from ..errors import MasmError
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    hub_id: str | None = None  # loaded with from_pretrained
    config: dict[str, Any] = field(default_factory=dict)  # random init (seeded) when hub_id is None
    local_dir: str | None = None  # a directory resolved at load time (e.g. the demo's pretrained backbone)


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

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "clip-vit-l14",
            "CLIP ViT-L/14, 224 px (the paper's backbone)",
            hub_id="openai/clip-vit-large-patch14",
        ),
        BackboneSpec("clip-vit-b16", "CLIP ViT-B/16, 224 px", hub_id="openai/clip-vit-base-patch16"),
        BackboneSpec(
            "clip-vit-l14-random", "ViT-L/14 shapes, random init (timing and shape tests)", config=_VIT_L14
        ),
        BackboneSpec(
            "clip-vit-b16-random", "ViT-B/16 shapes, random init (speed benchmark)", config=_VIT_B16
        ),
        BackboneSpec(
            "tiny-clip",
            "4-layer 64-wide CLIP vision tower at 32 px, random init (unit tests)",
            config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
        ),
        BackboneSpec(
            "demo-clip",
            "small CLIP vision tower pretrained on real photo crops (shipped; recipe in masm.demo.pretrain)",
            local_dir="demo-clip",
        ),
    ]
}


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


def load_backbone(name: str) -> CLIPVisionModel:
    """Build the backbone ``name`` (registry name, hub id or local directory) in float32, eval mode."""
    spec = resolve_backbone(name)
    if spec.hub_id is None and spec.local_dir is None:
        # Seeded so that the same named random backbone is the same model every time (checkpoints of
        # tiny test models can then store adapter weights only, like those of pretrained ones).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPVisionModel(CLIPVisionConfig(**spec.config))
        return model.eval()
    source = spec.hub_id or _local_path(spec)
    hf_logging.disable_progress_bar()  # no per-load "Loading weights" bars in our own progress output
    try:  # the local cache first: no network round trips (and their retries) when the weights are here
        model = CLIPVisionModel.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as local_err:
        if spec.hub_id is None or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise MasmError(_missing_weights_message(spec, source, local_err)) from None
        logger.info("%s is not in the local Hugging Face cache; trying to download it", source)
        try:
            model = CLIPVisionModel.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise MasmError(_missing_weights_message(spec, source, err)) from None
    return model.eval()


def backbone_preprocessing(model: CLIPVisionModel) -> Preprocessing:
    """CLIP's mean/std at the backbone's native input size."""
    return Preprocessing(input_size=int(model.config.image_size))


@torch.no_grad()
def backbone_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of a backbone's weights (a strided sample of every tensor plus its sum).

    Stored in checkpoints that hold adapter weights only, so that loading them onto different pretrained
    weights is an error instead of a silently wrong detector.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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
            f"`huggingface-cli download {source}` and copy ~/.cache/huggingface over, or save the model with "
            f"`CLIPVisionModel.from_pretrained('{source}').save_pretrained(DIR)` and pass --backbone DIR."
        )
    return f"could not load backbone from {source}: {err}"

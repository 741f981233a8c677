"""Backbone registry: the one place that knows which vision transformers exist and where a name points.

A backbone is named by a registry name (``clip-vit-l14``), a Hugging Face hub id, a local directory saved
with ``save_pretrained``, or a masm checkpoint directory (its merged backbone and its head then initialise a
new detector). :func:`resolve_backbone` turns a name into a :class:`BackboneSpec` and
:func:`backbone_location` a spec into the hub id or directory its weights come from; building the model
(by its family) is :mod:`~masm.models.backbone_loading`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MasmError


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: what a backbone name stands for."""

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


def demo_backbone_dir() -> Path:
    """Where ``masm demo`` keeps its pretrained small backbone (``$MASM_CACHE_DIR/demo-clip``)."""
    root = os.environ.get("MASM_CACHE_DIR") or Path.home() / ".cache" / "masm"
    return Path(root) / "demo-clip"


def packaged_demo_backbone_dir() -> Path:
    """The demo backbone shipped inside the package (made by ``python -m masm.demo.pretrain``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo-clip"


def backbone_location(spec: BackboneSpec) -> str:
    """The hub id or local directory the weights of ``spec`` are read from (the demo backbone: the
    user's rebuilt one, else the shipped one)."""
    if spec.hub_id:
        return spec.hub_id
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

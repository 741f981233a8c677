"""Backbone families: what masm needs to know about each kind of vision transformer.

A family supplies, behind one small interface, its model class (picked from the Hugging Face config's
``model_type``, never guessed), its pooled feature (the family's ``pooler_output``), its preprocessing
(input size, mean/std) and its default MASM targets (the encoder's attention projections only: not, for
example, SigLIP's attention-pooling head). The detector, the checkpoints and the benchmarks ask the family
and never branch on the architecture themselves.

timm ViTs keep q, k and v in one fused ``qkv`` Linear. :class:`TimmFamily` splits it into three Linears
before adapters go in and fuses them back after ``merge()``: every projection then gets its own SVD, as
Effort decomposes CLIP's separate q/k/v. An SVD of the fused ``3d × d`` matrix would share one residual
input subspace among q, k and v (its smallest singular directions are the inputs *all three* barely use),
give ``6d + 2`` instead of ``8d + 4`` Effort parameters per block, and make the same method mean something
else on timm than on CLIP.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import MasmError
from ..method.apply import replace_module
from .preprocessing import CLIP_MEAN, CLIP_STD, Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class BackboneFamily:
    """A Hugging Face vision tower whose ``forward(pixel_values=...)`` returns a ``pooler_output``."""

    name: str = ""
    description: str = ""
    model_types: dict[str, str] = {}  # config.model_type -> transformers model class
    attention_targets: str = ""  # regex (re.search on module names): MASM's default targets
    mlp_targets: str = ""  # regex: the encoder's MLP Linears (added to the targets on request)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    requires: str | None = None  # an optional package the family needs
    # Where the encoder's transformer blocks are (the first that exists; names differ across transformers
    # versions). Explanation maps read the token sequence entering one of them.
    block_paths: tuple[str, ...] = ("encoder.layers",)
    attention_name: str = "self_attn"  # each block's attention module
    readout: str = "class"  # what the pooled feature reads: "class" (the first token) or "all" (tokens)

    # -- building ---------------------------------------------------------------------------------------
    def check_available(self) -> None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            raise MasmError(
                f"backbone family {self.name!r} needs the {self.requires} package: "
                f'pip install "masm[{self.requires}]"'
            )

    def model_class(self, model_type: str) -> type:
        self.check_available()
        import transformers

        name = self.model_types[model_type]
        if not hasattr(transformers, name):
            raise MasmError(
                f"backbone family {self.name!r} ({model_type}) needs transformers with {name}; "
                f"this one ({transformers.__version__}) has none"
            )
        return getattr(transformers, name)

    def config_from_dict(self, config: dict[str, Any]):
        model_type = config.get("model_type") or next(iter(self.model_types))
        cls = self.model_class(model_type).config_class
        data = {k: v for k, v in config.items() if k not in _HF_BOOKKEEPING}
        return cls.from_dict(data)

    def build(self, config: dict[str, Any]) -> nn.Module:
        """A randomly initialised model of this family from a config dict (no weights are read)."""
        hf_config = self.config_from_dict(config)
        return self.model_class(hf_config.model_type)(hf_config)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the targets separate Linears before adapters go in (default: nothing to do)."""
        return model

    def finalize_merged(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`prepare` once adapters are folded back into plain Linears."""
        return model

    # -- using ------------------------------------------------------------------------------------------
    def pooled(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).pooler_output

    def feature_dim(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def input_size(self, model: nn.Module) -> int:
        return int(model.config.image_size)

    def preprocessing(self, model: nn.Module) -> Preprocessing:
        return Preprocessing(input_size=self.input_size(model), mean=self.mean, std=self.std)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The encoder's blocks, in order (an ``nn.ModuleList`` or ``nn.Sequential``).

        Every block takes the token sequence ``(N, T, D)`` as its first argument, and the patch tokens are
        the last ``(input_size / patch_size)²`` of them (class and register tokens come first).
        """
        for path in self.block_paths:
            try:
                return model.get_submodule(path)
            except AttributeError:
                continue
        raise MasmError(
            f"backbone family {self.name!r}: no encoder blocks at {' or '.join(self.block_paths)}"
        )

    def patch_size(self, model: nn.Module) -> int:
        return int(model.config.patch_size)

    def readout_of(self, model: nn.Module) -> str:
        return self.readout

    @contextmanager
    def attention_probabilities(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """While active, every forward appends each block's attention probabilities ``(N, heads, T, T)``
        to the list yielded, in block order (part of the autograd graph, so they can be differentiated).

        Hugging Face's fused (SDPA) attention returns no probabilities, so the model runs its eager
        attention meanwhile (the same function, up to rounding) and gets its own back afterwards.
        """
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        found: list[torch.Tensor] = []
        hooks = [
            getattr(block, self.attention_name).register_forward_hook(
                lambda _m, _i, out: found.append(out[1])
            )
            for block in self.blocks(model)
        ]
        try:
            yield found
        finally:
            for hook in hooks:
                hook.remove()
            model.set_attn_implementation(previous)


class ClipFamily(BackboneFamily):
    name = "clip"
    description = "CLIP vision towers (OpenAI CLIP, OpenCLIP exports in transformers format)"
    model_types = {"clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel"}
    # Unchanged from the first release, so the configs of existing checkpoints resolve to the same layers.
    attention_targets = r"(q_proj|k_proj|v_proj|out_proj)$"
    mlp_targets = r"encoder\.layers\.\d+\.mlp\.(fc1|fc2)$"


class SiglipFamily(BackboneFamily):
    name = "siglip"
    description = (
        "SigLIP vision towers, and SigLIP 2 at fixed resolution (pooled: the attention-pooling head)"
    )
    model_types = {"siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipVisionModel"}
    # Anchored to the encoder: the attention-pooling head's out_proj is an nn.Linear too.
    attention_targets = r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
    mlp_targets = r"encoder\.layers\.\d+\.mlp\.(fc1|fc2)$"
    mean, std = HALF, HALF
    readout = "all"  # no class token: the attention-pooling head reads every token


class Siglip2Family(SiglipFamily):
    """SigLIP 2 NaFlex: the vision tower reads patch sequences; a square image is cut into them here."""

    name = "siglip2"
    description = "SigLIP 2 NaFlex vision towers (square inputs of sqrt(num_patches) x patch_size pixels)"
    model_types = {"siglip2_vision_model": "Siglip2VisionModel", "siglip2": "Siglip2VisionModel"}

    def pooled(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        patch = int(model.config.patch_size)
        n, c, h, w = pixel_values.shape
        gh, gw = h // patch, w // patch
        # Channels last inside a patch, rows then columns: the order of Siglip2's image processor.
        patches = (
            pixel_values.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, -1)
        )
        mask = torch.ones(n, gh * gw, dtype=torch.int32, device=pixel_values.device)
        shapes = torch.tensor([[gh, gw]] * n, dtype=torch.long, device=pixel_values.device)
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output

    def input_size(self, model: nn.Module) -> int:
        return math.isqrt(int(model.config.num_patches)) * int(model.config.patch_size)


class Dinov2Family(BackboneFamily):
    name = "dinov2"
    description = "DINOv2 (with or without registers; pooled: the layer-normed CLS token)"
    model_types = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
    # transformers 5 names (q_proj ... o_proj) and transformers 4 names (attention.query ... output.dense).
    attention_targets = r"encoder\.layer\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj|attention\.(query|key|value)|output\.dense)$"
    mlp_targets = r"encoder\.layer\.\d+\.mlp\.(fc1|fc2|weights_in|weights_out)$"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    block_paths = ("encoder.layer",)
    attention_name = "attention"

    def input_size(self, model: nn.Module) -> int:
        # config.image_size is the pretraining resolution (518); DINOv2's processor feeds 224 px crops.
        return min(int(model.config.image_size), 224)


class Dinov3Family(BackboneFamily):
    name = "dinov3"
    description = "DINOv3 ViTs (pooled: the layer-normed CLS token)"
    model_types = {"dinov3_vit": "DINOv3ViTModel"}
    attention_targets = r"layer\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)$"
    mlp_targets = r"layer\.\d+\.mlp\.(up_proj|down_proj|gate_proj)$"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    block_paths = ("model.layer", "layer")
    attention_name = "attention"


class TimmFamily(BackboneFamily):
    """Any timm ViT whose attention has a fused ``qkv`` Linear, through transformers' ``TimmWrapperModel``."""

    name = "timm"
    description = "timm ViTs with a fused qkv (hub ids timm/..., or TimmWrapperModel directories)"
    model_types = {"timm_wrapper": "TimmWrapperModel"}
    attention_targets = r"blocks\.\d+\.attn\.(qkv\.(q_proj|k_proj|v_proj)|proj)$"
    mlp_targets = r"blocks\.\d+\.mlp\.(fc1|fc2)$"
    requires = "timm"
    block_paths = ("timm_model.blocks",)

    def config_from_dict(self, config: dict[str, Any]):
        # TimmWrapperConfig reads its label count from num_classes; the detector never uses timm's head.
        return super().config_from_dict({"num_classes": 2, **config})

    def prepare(self, model: nn.Module) -> nn.Module:
        fused = [
            (n, m) for n, m in model.named_modules() if n.endswith("attn.qkv") and isinstance(m, nn.Linear)
        ]
        if not fused:
            raise MasmError(
                f"timm model {model.config.architecture!r} has no ViT attention with a fused qkv Linear "
                "(blocks.N.attn.qkv); only such timm ViTs are supported"
            )
        for name, linear in fused:
            attn = model.get_submodule(name.rpartition(".")[0])
            if getattr(attn, "q_bias", None) is not None or linear.out_features % 3:
                raise MasmError(
                    f"timm model {model.config.architecture!r}: {name} is not a plain fused q/k/v projection "
                    "(EVA/BEiT-style separate q/v biases); not supported"
                )
            replace_module(model, name, SplitQKV(linear))
        return model

    def finalize_merged(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, SplitQKV):
                replace_module(model, name, module.fuse())
        return model

    def feature_dim(self, model: nn.Module) -> int:
        return int(model.timm_model.num_features)

    def patch_size(self, model: nn.Module) -> int:
        return int(model.timm_model.patch_embed.patch_size[0])

    def readout_of(self, model: nn.Module) -> str:
        return "class" if getattr(model.timm_model, "global_pool", "token") == "token" else "all"

    @contextmanager
    def attention_probabilities(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        # timm's Attention computes explicit probabilities (then its attn_drop) once fused_attn is off.
        found: list[torch.Tensor] = []
        attentions = [block.attn for block in self.blocks(model)]
        previous = [attn.fused_attn for attn in attentions]
        hooks = []
        for attn in attentions:
            attn.fused_attn = False
            hooks.append(attn.attn_drop.register_forward_hook(lambda _m, _i, out: found.append(out)))
        try:
            yield found
        finally:
            for hook in hooks:
                hook.remove()
            for attn, fused in zip(attentions, previous):
                attn.fused_attn = fused

    def input_size(self, model: nn.Module) -> int:
        patch_embed = getattr(model.timm_model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            return int(patch_embed.img_size[0])
        return int(model.timm_model.pretrained_cfg["input_size"][-1])

    def preprocessing(self, model: nn.Module) -> Preprocessing:
        cfg = getattr(model.timm_model, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        return Preprocessing(input_size=self.input_size(model), mean=mean, std=std)


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear as three Linears ``q_proj``, ``k_proj``, ``v_proj``; outputs concatenated.

    Computes exactly what the fused Linear did (the same weights, row blocks of it), so the attention module
    around it needs no change.
    """

    def __init__(self, fused: nn.Linear):
        super().__init__()
        d = fused.out_features // 3
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part = nn.Linear(
                fused.in_features,
                d,
                bias=fused.bias is not None,
                device=fused.weight.device,
                dtype=fused.weight.dtype,
            )
            with torch.no_grad():
                part.weight.copy_(fused.weight[i * d : (i + 1) * d])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * d : (i + 1) * d])
            part.weight.requires_grad_(fused.weight.requires_grad)
            setattr(self, name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        parts = [self.q_proj, self.k_proj, self.v_proj]
        if not all(type(p) is nn.Linear for p in parts):
            raise RuntimeError("fuse() needs plain Linears: merge the adapters first")
        q = parts[0]
        fused = nn.Linear(
            q.in_features,
            3 * q.out_features,
            bias=q.bias is not None,
            device=q.weight.device,
            dtype=q.weight.dtype,
        )
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if q.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        return fused


FAMILIES: dict[str, BackboneFamily] = {
    f.name: f
    for f in (ClipFamily(), SiglipFamily(), Siglip2Family(), Dinov2Family(), Dinov3Family(), TimmFamily())
}

# Keys of a saved Hugging Face config that are bookkeeping, not architecture.
_HF_BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"}


def supported_families() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())


def family_for_config(config: dict[str, Any], where: str) -> BackboneFamily:
    """The family of a Hugging Face config dict; an unsupported ``model_type`` is an error naming ``where``."""
    model_type = config.get("model_type")
    if model_type is None and "architecture" in config:  # a timm hub config (no model_type of its own)
        model_type = "timm_wrapper"
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise MasmError(
        f"{where}: model_type {model_type!r} is not a supported backbone; supported families: "
        f"{supported_families()}"
    )


def family_of(model: nn.Module) -> BackboneFamily:
    """The family of a built backbone (from its ``config.model_type``)."""
    return family_for_config({"model_type": getattr(model.config, "model_type", None)}, type(model).__name__)

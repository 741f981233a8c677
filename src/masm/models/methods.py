"""Fine-tuning methods as configurations of one code path.

``masm``, ``fmsd`` (MASM on layers selected before training) and the special cases ``effort`` /
``effort-reg`` use :class:`~masm.method.MASMLinear`; ``lora``
uses the ``peft`` library on the same target layers; ``full`` trains every backbone weight; ``linear``
trains the head only; ``ln-tune`` (GenD, WACV 2026) trains the LayerNorms and the head, on the
L2-normalised pooled feature. The trainer never branches on the method: it asks :func:`apply_method` to prepare the
backbone and the method's :class:`MASMConfig` (or ``None``) for losses and masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..config import from_dict, merge_dicts, to_dict
from ..errors import ConfigError
from ..method import MASMConfig, apply_masm, find_targets, merge_masm
from ..method.apply import replace_module
from ..method.config import ATTENTION_AND_MLP_TARGETS, ATTENTION_TARGETS, MaskConfig
from .families import BackboneFamily


@dataclass
class LoraSettings:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})


@dataclass
class FeatureSettings:
    """GenD's hypersphere: the head reads the L2-normalised feature; alignment and uniformity losses
    (Wang & Isola, 2020) on it are options."""

    l2_normalize: bool = field(default=False, metadata={"help": "head on the L2-normalised pooled feature"})
    lambda_align: float = field(
        default=0.0,
        metadata={"help": "weight of the alignment loss (mean squared distance of same-label pairs)"},
    )
    lambda_uniform: float = field(
        default=0.0, metadata={"help": "weight of the uniformity loss (log mean exp(-t d^2) over all pairs)"}
    )
    uniform_t: float = field(default=2.0, metadata={"help": "temperature t of the uniformity loss"})

    def __post_init__(self) -> None:
        if self.lambda_align < 0 or self.lambda_uniform < 0 or self.uniform_t <= 0:
            raise ConfigError("features.lambda_align/lambda_uniform must be >= 0 and uniform_t > 0")
        if (self.lambda_align or self.lambda_uniform) and not self.l2_normalize:
            raise ConfigError(
                "features.lambda_align/lambda_uniform act on the L2-normalised feature: set l2_normalize"
            )


@dataclass
class MethodConfig:
    """How the backbone is fine-tuned. ``masm.target_modules`` also selects LoRA's layers."""

    name: str = field(default="masm", metadata={"help": "preset this config started from"})
    adapter: Literal["masm", "lora", "full", "linear", "ln-tune"] = field(
        default="masm",
        metadata={
            "help": "which weights train: MASM subspaces, LoRA, all, the head only, or LayerNorms + head"
        },
    )
    masm: MASMConfig = field(default_factory=MASMConfig, metadata={"help": "MASM / Effort settings"})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings"})
    features: FeatureSettings = field(
        default_factory=FeatureSettings,
        metadata={"help": "the pooled feature the head reads, and its losses"},
    )

    @property
    def masm_config(self) -> MASMConfig | None:
        """The MASM config for losses and masks, or None when the method has no MASM layers."""
        return self.masm if self.adapter == "masm" else None


_NO_MASK = to_dict(MaskConfig(enabled=False))

# Presets: overlays on MethodConfig's defaults.
METHODS: dict[str, dict[str, Any]] = {
    "masm": {},
    # Effort as its released code trains: one rank-1 residual subspace, cross-entropy only.
    "effort": {
        "masm": {
            "num_subspaces": 1,
            "subspace_rank": 1,
            "lambda_orth": 0.0,
            "lambda_spec": 0.0,
            "semantic_guard": "off",
            "mask": _NO_MASK,
        },
    },
    # Effort as its paper describes it: with the orthogonality and singular-value (energy) terms.
    "effort-reg": {
        "masm": {
            "num_subspaces": 1,
            "subspace_rank": 1,
            "lambda_orth": 1.0,
            "lambda_spec": 1.0,
            "semantic_guard": "penalty",
            "lambda_guard": 1.0,  # = lambda_orth, the weight the penalty had as part of L_orth
            "spectral_mode": "energy",
            "mask": _NO_MASK,
        },
    },
    # FMSD (the paper's later version): the layers to adapt are chosen from their gradients' bias and
    # variance before training; the mask then only balances the subspaces inside the chosen layers.
    "fmsd": {"masm": {"select": {"enabled": True}, "mask": {"layer_selection": False}}},
    "lora": {"adapter": "lora"},
    "full": {"adapter": "full"},
    "linear": {"adapter": "linear"},
    # GenD: LayerNorm tuning with the head on the L2-normalised feature (alignment/uniformity: options).
    "ln-tune": {"adapter": "ln-tune", "features": {"l2_normalize": True}},
}


def method_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """The preset ``name`` with ``overrides`` (a nested dict, as from YAML) laid over it."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    data = merge_dicts(copy.deepcopy(METHODS[name]), overrides or {})
    data["name"] = name
    return from_dict(MethodConfig, data, "method")


def apply_method(backbone: nn.Module, config: MethodConfig, cache_dir=None) -> nn.Module:
    """Prepare ``backbone`` in place for ``config``: insert adapters and set ``requires_grad``."""
    if config.adapter == "masm":
        return apply_masm(backbone, config.masm, cache_dir=cache_dir)
    if config.adapter == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        names = [name for name, _ in find_targets(backbone, config.masm.target_modules)]
        lora = LoraConfig(
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=names,
        )
        backbone = inject_adapter_in_model(lora, backbone)
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        return backbone
    if config.adapter == "ln-tune":
        norms = [m for m in backbone.modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise ConfigError("method ln-tune: the backbone has no LayerNorm to tune")
        for param in backbone.parameters():
            param.requires_grad_(False)
        for norm in norms:
            for param in norm.parameters():
                param.requires_grad_(True)
        return backbone
    for param in backbone.parameters():
        param.requires_grad_(config.adapter == "full")
    return backbone


def resolve_targets(config: MethodConfig, family: BackboneFamily) -> MethodConfig:
    """``config`` with the generic default targets replaced by ``family``'s own.

    ``ATTENTION_TARGETS`` (the default) means "the encoder's attention projections" and
    ``ATTENTION_AND_MLP_TARGETS`` adds the MLP; each family names those layers its own way. Any other regex
    is the user's and stays as it is.
    """
    pattern = config.masm.target_modules
    if pattern == ATTENTION_TARGETS:
        resolved = family.attention_targets
    elif pattern == ATTENTION_AND_MLP_TARGETS:
        resolved = f"({family.attention_targets})|({family.mlp_targets})"
    else:
        return config
    if resolved == pattern:
        return config
    config = copy.deepcopy(config)
    config.masm.target_modules = resolved
    return config


def merge_method(backbone: nn.Module) -> nn.Module:
    """Fold any adapter (MASM or LoRA) into plain Linear layers, in place."""
    merge_masm(backbone)
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return backbone
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            replace_module(backbone, name, module.get_base_layer())
    return backbone

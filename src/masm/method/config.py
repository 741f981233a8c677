"""The MASM configuration: every knob of ``shared/docs/method.md`` is a field here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

ATTENTION_TARGETS = r"(q_proj|k_proj|v_proj|out_proj)$"
ATTENTION_AND_MLP_TARGETS = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"


@dataclass
class MaskConfig:
    """Selective layer mask (method.md §4): pauses subspaces by their gradient signal-to-noise ratio."""

    enabled: bool = field(default=True, metadata={"help": "use the selective layer mask at all"})
    beta: float = field(default=0.95, metadata={"help": "EMA factor of the gradient mean and square"})
    warmup: int = field(default=100, metadata={"help": "steps with every subspace active before masking"})
    interval: int = field(default=50, metadata={"help": "steps a mask is held before it is recomputed"})
    layer_selection: bool = field(default=True, metadata={"help": "freeze layers outside the top fraction"})
    top_fraction: float = field(default=0.75, metadata={"help": "fraction of layers kept by layer selection"})
    subspace_balance: bool = field(default=True, metadata={"help": "pause subspaces that dominate a layer"})
    delta: float = field(default=0.5, metadata={"help": "pause a subspace whose share exceeds (1+delta)/K"})
    eps: float = field(default=1e-12, metadata={"help": "numerical floor of the learning-state ratio"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"mask.beta must be in [0, 1), got {self.beta}")
        if self.interval < 1 or self.warmup < 0:
            raise ConfigError("mask.interval must be >= 1 and mask.warmup >= 0")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(f"mask.top_fraction must be in (0, 1], got {self.top_fraction}")


@dataclass
class MASMConfig:
    """Multi-artifact subspace adaptation of the Linear layers whose names match ``target_modules``.

    Effort is the special case ``num_subspaces=1, subspace_rank=1``, no mask and no regularisers.
    """

    num_subspaces: int = field(default=4, metadata={"help": "K: number of artifact subspaces per layer"})
    subspace_rank: int = field(default=4, metadata={"help": "m: rank of each artifact subspace"})
    target_modules: str = field(
        default=ATTENTION_TARGETS, metadata={"help": "regex searched in module names selecting the Linears"}
    )
    slicing: Literal["contiguous", "interleaved"] = field(
        default="contiguous",
        metadata={"help": "how residual singular directions are dealt to subspaces"},
    )
    svd_dtype: Literal["float32", "float64"] = field(
        default="float64", metadata={"help": "precision of the one-off SVD (never half precision)"}
    )
    lambda_orth: float = field(default=1.0, metadata={"help": "weight of the orthogonality loss"})
    lambda_spec: float = field(default=1.0, metadata={"help": "weight of the spectral-consistency loss"})
    semantic_guard: Literal["penalty", "project", "off"] = field(
        default="project",
        metadata={
            "help": "keep artifact subspaces out of the semantic one: loss, gradient projection, or off"
        },
    )
    guard_rank: float = field(
        default=0.25,  # chosen on `masm bench quality` (README): 0.5 learned more slowly, 0.1 no better
        metadata={
            "help": "r_g as a fraction of min(d_out, d_in): the guard covers the top r_g principal directions "
            "(clamped to the principal rank r = n - K*m)"
        },
    )
    spectral_mode: Literal["artifact", "energy"] = field(
        default="artifact",
        metadata={"help": "artifact: keep each subspace's singular values; energy: keep ||W||_F (Effort)"},
    )
    mask: MaskConfig = field(default_factory=MaskConfig, metadata={"help": "selective layer mask"})

    def __post_init__(self) -> None:
        if self.num_subspaces < 1 or self.subspace_rank < 1:
            raise ConfigError("num_subspaces and subspace_rank must be >= 1")
        if not 0.0 < self.guard_rank <= 1.0:
            raise ConfigError(f"guard_rank must be a fraction in (0, 1], got {self.guard_rank}")
        if isinstance(self.mask, dict):  # direct construction with a plain dict
            from ..config import from_dict

            self.mask = from_dict(MaskConfig, self.mask, "mask")

    @property
    def artifact_rank(self) -> int:
        """K·m: the number of residual singular directions that become trainable."""
        return self.num_subspaces * self.subspace_rank

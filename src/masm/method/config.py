"""The MASM configuration: every knob of ``shared/docs/method.md`` is a field here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError, SettingsError

ATTENTION_TARGETS = r"(q_proj|k_proj|v_proj|out_proj)$"
ATTENTION_AND_MLP_TARGETS = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
# 1.0: until the guard penalty had its own weight it was part of L_orth, weighted by lambda_orth (default
# 1.0), so this default keeps every earlier run's objective.
LAMBDA_GUARD_DEFAULT = 1.0


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
        # An enabled mask whose rules cannot act would train exactly as without it, silently.
        if self.enabled and not (self.layer_selection or self.subspace_balance):
            raise SettingsError(
                ["enabled", "layer_selection", "subspace_balance"],
                "the mask is enabled with both of its rules off, so it never pauses anything: "
                "set enabled: false, or turn a rule on",
            )
        if self.enabled and self.layer_selection and self.top_fraction == 1.0:
            raise SettingsError(
                ["layer_selection", "top_fraction"],
                "layer selection keeping the top fraction 1.0 of the layers keeps every layer: "
                "set layer_selection: false, or a top_fraction below 1",
            )


@dataclass
class SelectConfig:
    """FMSD's forgery-aware layer selection: which targeted layers are decomposed and adapted at all.

    Before training, ``steps`` batches measure the signal-to-noise ratio of every targeted layer's weight
    gradient (the mask's learning state, method.md §4, on the full weight) and keep the top ``fraction``;
    only those become MASM layers, the others stay plain frozen Linears. The selection is part of training
    (:mod:`masm.training.layer_selection`); a detector built outside it with ``layers`` unset (e.g.
    ``create_detector(name, "fmsd")``) adapts every target.
    """

    enabled: bool = field(
        default=False,
        metadata={"help": "select the layers to adapt before training (FMSD); false: adapt every target"},
    )
    steps: int = field(
        default=50, metadata={"help": "training batches whose weight gradients score the layers"}
    )
    fraction: float = field(
        default=0.5, metadata={"help": "fraction of the targeted layers kept (at least one)"}
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "the adapted layers' module names, filled in by the selection (null: not selected yet; "
            "when set, only these targets are adapted and no selection runs)"
        },
    )

    def __post_init__(self) -> None:
        # One batch has no spread: its variance term is 0 and every layer would score 1.
        if self.steps < 2:
            raise ConfigError(f"select.steps must be >= 2 (the variance needs two batches), got {self.steps}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"select.fraction must be in (0, 1], got {self.fraction}")
        if self.layers is not None and not self.layers:
            raise ConfigError("select.layers is empty: name at least one layer, or null to select them")


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
    lambda_guard: float = field(
        default=LAMBDA_GUARD_DEFAULT,
        metadata={
            "help": "weight of the semantic guard's penalty (used only with semantic_guard: penalty; "
            "logged as the term 'guard')"
        },
    )
    semantic_guard: Literal["penalty", "project", "off"] = field(
        default="project",
        metadata={
            "help": "keep artifact subspaces out of the semantic one: loss, gradient projection, or off"
        },
    )
    guard_rank: float = field(
        default=0.25,  # chosen on `masm bench quality` (docs/benchmarks.md): 0.5 learned more slowly, 0.1 no better
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
    select: SelectConfig = field(
        default_factory=SelectConfig,
        metadata={"help": "FMSD: choose the layers to adapt from their gradients before training"},
    )

    def __post_init__(self) -> None:
        if self.num_subspaces < 1 or self.subspace_rank < 1:
            raise ConfigError("num_subspaces and subspace_rank must be >= 1")
        if not 0.0 < self.guard_rank <= 1.0:
            raise ConfigError(f"guard_rank must be a fraction in (0, 1], got {self.guard_rank}")
        if isinstance(self.mask, dict):  # direct construction with a plain dict
            from ..config import from_dict

            self.mask = from_dict(MaskConfig, self.mask, "mask")
        if isinstance(self.select, dict):
            from ..config import from_dict

            self.select = from_dict(SelectConfig, self.select, "select")
        for name in ("lambda_orth", "lambda_spec", "lambda_guard"):
            if getattr(self, name) < 0:  # a negative weight would reward what the term penalises
                raise SettingsError([name], f"a loss weight must be >= 0, got {getattr(self, name)}")
        self._check_no_silent_no_ops()

    def _check_no_silent_no_ops(self) -> None:
        """Settings that request a mechanism and, together, make it a no-op are an error naming them.

        Only combinations that are contradictory whatever the user meant: a field left at its default cannot
        be told from one set explicitly (and resolved configs saved with a run hold every field), so a
        default value never counts as a request. Hence no check of ``guard_rank`` with ``semantic_guard:
        off``: its default changed before, and runs saved with the old one must still load.
        """
        if self.semantic_guard == "penalty" and self.lambda_guard == 0:
            raise SettingsError(
                ["semantic_guard", "lambda_guard"],
                "the guard penalty is requested with weight 0, which trains without a guard: "
                "set lambda_guard > 0, or semantic_guard: off",
            )
        # 0 reads as "no penalty", consistent with any guard; the default is indistinguishable from unset
        if self.semantic_guard != "penalty" and self.lambda_guard not in (0.0, LAMBDA_GUARD_DEFAULT):
            raise SettingsError(
                ["lambda_guard", "semantic_guard"],
                f"lambda_guard weighs the penalty of semantic_guard: penalty only; with semantic_guard: "
                f"{self.semantic_guard} it has no effect: remove it, or set semantic_guard: penalty",
            )
        mask, K = self.mask, self.num_subspaces
        if mask.enabled and K == 1 and not mask.layer_selection:
            raise SettingsError(
                ["num_subspaces", "mask.enabled", "mask.layer_selection"],
                "with one subspace per layer subspace balance has nothing to balance, and layer selection "
                "is off: the mask never pauses anything; set mask.enabled: false, or mask.layer_selection",
            )
        # A subspace is paused when its share of its layer's learning state exceeds (1 + delta) / K; a share
        # is at most 1, so from delta = K - 1 on the rule can never fire.
        if mask.enabled and mask.subspace_balance and K > 1 and mask.delta >= K - 1:
            raise SettingsError(
                ["mask.delta", "num_subspaces", "mask.subspace_balance"],
                f"subspace balance pauses a subspace whose share exceeds (1 + delta)/K = "
                f"{(1 + mask.delta) / K:g}, which no share (at most 1) can: set delta below K - 1 = {K - 1}, "
                "or mask.subspace_balance: false",
            )

    @property
    def artifact_rank(self) -> int:
        """K·m: the number of residual singular directions that become trainable."""
        return self.num_subspaces * self.subspace_rank

"""The method: MASM adapter layers, their decomposition, losses and the selective layer mask."""

from .apply import (
    apply_masm,
    count_masm_parameters,
    find_targets,
    masm_layers,
    merge_masm,
    project_gradients,
    reproject_guarded,
    subspace_update,
)
from .config import MaskConfig, MASMConfig, SelectConfig
from .groups import LayerGroup
from .layer import MASMLinear, layer_groups
from .losses import regularizers, total_loss
from .mask import SelectiveMaskController

__all__ = [
    "LayerGroup",
    "MASMConfig",
    "MASMLinear",
    "MaskConfig",
    "SelectConfig",
    "SelectiveMaskController",
    "apply_masm",
    "count_masm_parameters",
    "find_targets",
    "layer_groups",
    "masm_layers",
    "merge_masm",
    "project_gradients",
    "regularizers",
    "reproject_guarded",
    "subspace_update",
    "total_loss",
]

"""masm: deepfake detection with Multi-Artifact Subspaces and selective layer Masks.

Library entry points (PEFT-style)::

    from masm import MASMConfig, apply_masm, merge_masm
    apply_masm(model, MASMConfig(num_subspaces=4, subspace_rank=4))   # in place; artifacts trainable
    merge_masm(model)                                                 # plain nn.Linear layers again

    from masm import create_detector, load_checkpoint
    detector = create_detector("clip-vit-l14", "masm")
"""

from .method import MaskConfig, MASMConfig, SelectiveMaskController, apply_masm, merge_masm
from .models import create_detector, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "MASMConfig",
    "MaskConfig",
    "SelectiveMaskController",
    "apply_masm",
    "create_detector",
    "load_checkpoint",
    "merge_masm",
    "save_checkpoint",
]

"""masm: deepfake detection with Multi-Artifact Subspaces and selective layer Masks.

Library entry points (PEFT-style)::

    from masm import MASMConfig, apply_masm, merge_masm
    apply_masm(model, MASMConfig(num_subspaces=4, subspace_rank=4))   # in place; artifacts trainable
    merge_masm(model)                                                 # plain nn.Linear layers again

    from masm import create_detector, load_checkpoint
    detector = create_detector("clip-vit-l14", "masm")

    import masm
    maps = masm.explain(detector, images)   # one map in [0, 1] per image: where the evidence for "fake" is
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Resolved on first use, so that `import masm` (and the command line's --help) does not import torch.
_EXPORTS = {
    "MASMConfig": "masm.method",
    "MaskConfig": "masm.method",
    "SelectiveMaskController": "masm.method",
    "apply_masm": "masm.method",
    "merge_masm": "masm.method",
    "create_detector": "masm.models",
    "load_checkpoint": "masm.models",
    "save_checkpoint": "masm.models",
}

# Callable packages: `masm.explain(detector, images)` (the package itself is callable, see its docstring).
_CALLABLE_PACKAGES = ("explain",)

__all__ = [*_EXPORTS, *_CALLABLE_PACKAGES]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"masm.{name}")
    raise AttributeError(f"module 'masm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_CALLABLE_PACKAGES])

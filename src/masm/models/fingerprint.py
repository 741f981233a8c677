"""A backbone's weights by name and content: tensor names independent of the transformers version, and a
cheap fingerprint that tells one set of pretrained weights from another (checked when a checkpoint holding
adapter weights only is loaded onto a backbone)."""

from __future__ import annotations

import hashlib
import re

import torch

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

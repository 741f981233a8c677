"""Effort's checkpoint files: reading one (tensors only, never code) and recognising its layout.

Effort's code saves detectors in two layouts; each becomes one form here, the CLIP vision tower's tensors
under ``CLIPVisionModel``'s names (``backbone``) and the linear head on its pooled output (``head``):

* DeepfakeBench (face detectors): ``backbone.*`` (the vision tower; ``backbone.vision_model.*`` when a
  transformers 4 ``CLIPVisionModel`` was saved) and ``head.weight [2, d]``, ``head.bias [2]``; ``module.``
  in front when saved under DDP; the whole maybe under ``state_dict`` or ``model``.
* UniversalFakeDetect (AI-generated images, ``UniversalFakeDetect_Benchmark/models/clip_models.py``):
  ``{'model': state_dict}`` of a module holding a whole Hugging Face ``CLIPModel`` as ``model`` and the head
  ``fc.weight [1, d]``, ``fc.bias [1]`` (one logit, binary cross-entropy). The vision tower is
  ``model.vision_model.*``; the text tower, ``logit_scale`` and ``text_projection`` take no part in an
  image's score and are dropped. Effort's ``fc`` reads the pooled output (``Linear(1024, 1)`` on ViT-L/14);
  one reading CLIP's projected image feature instead (``Linear(768, 1)``, as UniversalFakeDetect's own
  detector) is recognised by its width and folded: ``fc(P f) = (fc.weight P) f + fc.bias`` with ``P`` =
  ``model.visual_projection.weight`` (CLIP's projection has no bias), the same function of ``f``.

Every key is used or named here as ignorable; any other is an error naming it (a loader that skips what it
does not know turns a wrong file into a silently wrong detector). Written from the layouts' specification;
no Effort code is used.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MasmError

_UNIVFD_TOWER = "model.vision_model."
_UNIVFD_DROPPED = ("model.text_model.", "model.logit_scale", "model.text_projection.")
_UNIVFD_PROJECTION = "model.visual_projection.weight"


@dataclass
class EffortFile:
    """A file's tensors in one naming; ``prefix`` / ``head_prefix``: how the file names them (for messages)."""

    layout: str  # "deepfakebench" or "univfd"
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    prefix: str
    head_prefix: str
    notes: list[str] = field(default_factory=list)


def read_effort_file(path: Path) -> EffortFile:
    """The tensors of the Effort checkpoint at ``path``, its layout recognised and unwrapped."""
    state = load_state(path)
    notes = []
    if any(k.startswith("module.") for k in state):
        notes.append("stripped the DDP prefix 'module.'")
        state = {_strip(k, "module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        found = _deepfakebench(path, state)
    elif any(k.startswith(_UNIVFD_TOWER) for k in state):
        found = _univfd(path, state)
    else:
        raise MasmError(
            f"{path}: not an Effort checkpoint (neither DeepfakeBench's layout, 'backbone.*' and 'head.*', nor "
            f"UniversalFakeDetect's, '{_UNIVFD_TOWER}*' and 'fc.*'; first keys: "
            f"{', '.join(list(state)[:3]) or 'none'})"
        )
    found.notes[:0] = notes
    _check_head(path, found)
    return found


def _deepfakebench(path: Path, state: dict[str, torch.Tensor]) -> EffortFile:
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    others = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
    if others:
        raise MasmError(f"{path}: unexpected key {others[0]!r} (not part of Effort's detector)")
    if any(k.startswith("vision_model.") for k in backbone):  # a CLIPVisionModel saved under transformers 4
        backbone = {_strip(k, "vision_model."): v for k, v in backbone.items()}
    return EffortFile("deepfakebench", backbone, head, "backbone.", "head.")


def _univfd(path: Path, state: dict[str, torch.Tensor]) -> EffortFile:
    backbone, head, dropped, projection = {}, {}, 0, None
    for key, tensor in state.items():
        if key.startswith(_UNIVFD_TOWER):
            backbone[key[len(_UNIVFD_TOWER) :]] = tensor
        elif key.startswith("fc."):
            head[key[len("fc.") :]] = tensor
        elif key == _UNIVFD_PROJECTION:
            projection = tensor
        elif key.startswith(_UNIVFD_DROPPED):
            dropped += 1
        else:
            raise MasmError(
                f"{path}: unexpected key {key!r} (not part of Effort's UniversalFakeDetect model)"
            )
    found = EffortFile("univfd", backbone, head, _UNIVFD_TOWER, "fc.")
    if dropped:
        found.notes.append(f"dropped the text tower ({dropped} tensors)")
    weight = head.get("weight")
    if projection is not None and weight is not None and weight.ndim == 2 and projection.ndim == 2:
        width, (projected, pooled) = weight.shape[1], projection.shape
        if width == projected and width != pooled:  # equal widths: Effort's own reading, the pooled output
            head["weight"] = (weight.double() @ projection.double()).float()
            found.notes.append(
                f"fc reads CLIP's projected image feature ({projected}-d): folded into a head on the "
                f"{pooled}-d pooled output (fc.weight @ visual_projection.weight)"
            )
    return found


def _check_head(path: Path, found: EffortFile) -> None:
    """A linear head of one or two logits, and nothing else under its prefix."""
    for key in ("weight", "bias"):
        if key not in found.head:
            raise MasmError(f"{path}: missing key '{found.head_prefix}{key}'")
    unknown = sorted(set(found.head) - {"weight", "bias"})
    if unknown:
        raise MasmError(f"{path}: unexpected key '{found.head_prefix}{unknown[0]}'")
    weight, bias = found.head["weight"], found.head["bias"]
    if weight.ndim != 2 or weight.shape[0] not in (1, 2) or tuple(bias.shape) != (weight.shape[0],):
        raise MasmError(
            f"{path}: the head '{found.head_prefix}weight' {tuple(weight.shape)}, '{found.head_prefix}bias' "
            f"{tuple(bias.shape)} is not a linear head of one or two logits"
        )


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict of tensors (``torch.load(weights_only=True)``, or safetensors), unwrapped from
    ``state_dict`` or ``model`` when saved inside one."""
    if not path.is_file():
        raise MasmError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise MasmError(f"{path}: unreadable safetensors file ({err})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        needed = re.search(r"GLOBAL ([\w.]+)", message)
        if needed:  # weights_only refused a class or function reference
            raise MasmError(
                f"{path}: refused: unpickling it needs arbitrary code (it references {needed.group(1)}); only "
                "plain tensor checkpoints are read (torch.load weights_only=True)"
            ) from None
        reason = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise MasmError(f"{path}: not a PyTorch checkpoint ({_first_line(reason)})") from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise MasmError(
            f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {_first_line(str(err).splitlines())})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data:
        raise MasmError(f"{path}: not an Effort checkpoint (no state dict of tensors)")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MasmError(f"{path}: not an Effort checkpoint (entry {bad[0]!r} is not a tensor)")
    return data


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def _first_line(lines: list[str]) -> str:
    return next((line.strip() for line in lines if line.strip()), "unreadable")

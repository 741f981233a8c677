"""Import Effort's released detectors (``effort_clip_L14_trainOn_FaceForensic.pth`` and the like).

Effort (ICML 2025) is MASM with one rank-1 residual subspace per attention projection, so its checkpoints
become masm detectors that ``masm detect``, ``masm eval``, :func:`~masm.models.load_checkpoint` and
training (as ``model.backbone``: the starting point) accept.

The file layout, as Effort's model code names it (keys prefixed ``backbone.``, and ``module.`` when saved
under DDP; the whole file maybe under ``state_dict`` or ``model``):

* ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight_main, bias, U_residual [d_out,r], S_residual [r],
  V_residual [r,d_in]}``, and ``U_r, S_r, V_r`` (the principal factors, which the forward never uses and
  which are absent from some released files);
* every other CLIP vision tensor as ``CLIPModel.vision_model`` names it (``embeddings.*``,
  ``pre_layrnorm.*``, ``layer_norm1/2``, ``mlp.fc1/fc2``, ``post_layernorm.*``);
* ``head.weight [2, d]``, ``head.bias [2]`` on the ``pooler_output``.

A projection computes ``x (W_main + U_residual diag(S_residual) V_residual)ᵀ + b``. masm's layer computes
``x (W_sem + U diag(s) Vᵀ)ᵀ + b``, so ``W_sem = W_main``, ``U = U_residual``, ``s = S_residual`` and
``V = V_residualᵀ`` reproduce it exactly (:func:`effort_factor_state` is the one place that knows masm's
parameter names). Written from that specification; no Effort code is used.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MasmError
from ..method.apply import masm_layers
from .backbone_loading import LoadedBackbone, build_architecture
from .checkpoint import file_sha256, save_checkpoint
from .detector import Detector, build_detector
from .methods import method_config
from .preprocessing import FaceCropConfig, Preprocessing

_LAYER = re.compile(r"^(encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj)\.(\w+)$")
_FACTORS = ("weight_main", "U_residual", "S_residual", "V_residual")
_UNUSED = {"U_r", "S_r", "V_r", "weight_original_fnorm", "weight_main_fnorm"}  # never read by the forward
_IGNORED = re.compile(r"(^|\.)position_ids$")  # a buffer older transformers saved; rebuilt by the model
# The relative error allowed between the imported layer's weight and Effort's formula (float32 round-off).
WEIGHT_TOLERANCE = 1e-5


@dataclass
class EffortLayer:
    """One adapted projection of an Effort checkpoint."""

    weight_main: torch.Tensor
    bias: torch.Tensor | None
    U_residual: torch.Tensor
    S_residual: torch.Tensor
    V_residual: torch.Tensor

    def effective_weight(self) -> torch.Tensor:
        """Effort's formula: ``W_main + U_residual diag(S_residual) V_residual``."""
        return self.weight_main + self.U_residual @ torch.diag(self.S_residual) @ self.V_residual


@dataclass
class EffortCheckpoint:
    """An Effort checkpoint split into its adapted layers, the other vision tensors and the head."""

    path: str
    layers: dict[str, EffortLayer]
    vision: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    residual_rank: int
    notes: list[str] = field(default_factory=list)


def read_effort_checkpoint(path: str | Path) -> EffortCheckpoint:
    """Read and validate an Effort checkpoint file (``torch.load(weights_only=True)``, or safetensors)."""
    path = Path(path)
    state = _load_state(path)
    notes = []
    if any(k.startswith("module.") for k in state):
        notes.append("stripped the DDP prefix 'module.'")
    state = {_strip(k, "module."): v for k, v in state.items()}
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    others = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
    if not backbone or not head:
        raise MasmError(
            f"{path}: not an Effort checkpoint (no 'backbone.*' and 'head.*' tensors; "
            f"first keys: {', '.join(list(state)[:3]) or 'none'})"
        )
    if others:
        raise MasmError(f"{path}: unexpected key {others[0]!r} (not part of Effort's detector)")
    if any(k.startswith("vision_model.") for k in backbone):  # a CLIPVisionModel saved under transformers 4
        backbone = {_strip(k, "vision_model."): v for k, v in backbone.items()}
    for key in ("weight", "bias"):
        if key not in head:
            raise MasmError(f"{path}: missing key 'head.{key}'")
    layers, vision, absent_principal = _split_layers(path, backbone)
    ranks = {layer.S_residual.numel() for layer in layers.values()}
    if len(ranks) != 1:
        raise MasmError(f"{path}: the residual ranks differ between layers ({sorted(ranks)})")
    if absent_principal:
        notes.append(f"U_r/S_r/V_r absent in {absent_principal} layers (unused by the forward)")
    return EffortCheckpoint(str(path), layers, vision, head, ranks.pop(), notes)


def effort_detector(ckpt: EffortCheckpoint, backbone: str = "clip-vit-l14") -> Detector:
    """The checkpoint as masm's K=1, m=r detector (unmerged), built through masm's public path.

    ``backbone`` names the architecture only (a registry name or a directory with a ``config.json``); every
    weight comes from the file.
    """
    model, family = build_architecture(backbone)
    if family.name != "clip":
        raise MasmError(
            f"Effort checkpoints hold a CLIP vision tower; --backbone {backbone} is a {family.name} model"
        )
    _load_plain_backbone(ckpt, model, backbone)
    preprocessing = Preprocessing(input_size=family.input_size(model), face_crop=FaceCropConfig())
    method = method_config("effort", {"masm": {"subspace_rank": ckpt.residual_rank}})
    loaded = LoadedBackbone(model, family, preprocessing)
    # The SVD that apply_masm makes is replaced right away: cache nothing.
    detector = build_detector(loaded, backbone, method, cache_dir=False)
    detector.load_state_dict({f"head.{k}": v.float() for k, v in ckpt.head.items()}, strict=False)
    factors = effort_factor_state(detector, ckpt)
    result = detector.load_state_dict(factors, strict=False)
    if result.unexpected_keys:  # masm's layer no longer has the parameters the mapping names
        raise RuntimeError(f"effort_factor_state is out of date: {result.unexpected_keys[0]!r}")
    _verify_weights(detector, ckpt)
    return detector.eval()


def effort_factor_state(detector: Detector, ckpt: EffortCheckpoint) -> dict[str, torch.Tensor]:
    """The state-dict entries that put Effort's factors into ``detector``'s K=1 MASM layers.

    The one place that knows how masm's layer names its tensors: the frozen weight (``weight_sem``) and
    the artifact factors ``U``, ``s``, ``V`` (one subspace of rank 1 here), each found among the layer's own
    state-dict keys.
    """
    layers = dict(masm_layers(detector.backbone))
    state = detector.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, effort in ckpt.layers.items():
        prefix = f"backbone.{_find_layer(layers, name)}."
        targets = {
            "weight_sem": effort.weight_main,
            "U": effort.U_residual,
            "s": effort.S_residual,
            "V": effort.V_residual.T,
        }
        if effort.bias is not None:
            targets["bias"] = effort.bias
        for suffix, tensor in targets.items():
            key = prefix + suffix
            if key not in state:
                raise RuntimeError(
                    f"effort_factor_state is out of date: masm's layer has no {suffix!r} ({key})"
                )
            out[key] = tensor.to(state[key].dtype).contiguous()
    return out


def import_effort(
    ckpt_path: str | Path, out: str | Path, backbone: str = "clip-vit-l14"
) -> tuple[Path, dict[str, Any]]:
    """Write the Effort checkpoint ``ckpt_path`` as a masm checkpoint directory at ``out`` (merged weights:
    plain CLIP Linears, loadable without the MASM code path). Returns the directory and its import info."""
    ckpt = read_effort_checkpoint(ckpt_path)
    detector = effort_detector(ckpt, backbone)
    info = {
        "imported_from": {
            "format": "effort",
            "file": str(Path(ckpt_path).resolve()),
            "sha256": file_sha256(Path(ckpt_path)),
            "adapted_layers": len(ckpt.layers),
            "residual_rank": ckpt.residual_rank,
            "notes": ckpt.notes,
        }
    }
    detector.merge()
    return save_checkpoint(detector, out, merged=True, info=info), info


# -- reading ------------------------------------------------------------------------------------------------
def _load_state(path: Path) -> dict[str, torch.Tensor]:
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


def _split_layers(path: Path, backbone: dict[str, torch.Tensor]):
    if not any(key.endswith(".weight_main") for key in backbone):
        raise MasmError(
            f"{path}: not an Effort checkpoint (no SVD layers encoder.layers.N.self_attn.*_proj.weight_main)"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    vision: dict[str, torch.Tensor] = {}
    for key, tensor in backbone.items():
        match = _LAYER.match(key)
        if match:
            grouped.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif not _IGNORED.search(key):
            vision[key] = tensor
    layers: dict[str, EffortLayer] = {}
    absent_principal = 0
    for name, parts in sorted(grouped.items()):
        for factor in _FACTORS:
            if factor not in parts:
                raise MasmError(f"{path}: missing key 'backbone.{name}.{factor}'")
        unknown = sorted(set(parts) - set(_FACTORS) - _UNUSED - {"bias"})
        if unknown:
            raise MasmError(f"{path}: unexpected key 'backbone.{name}.{unknown[0]}'")
        absent_principal += not (_UNUSED & set(parts))
        layer = EffortLayer(
            weight_main=parts["weight_main"].float(),
            bias=parts["bias"].float() if "bias" in parts else None,
            U_residual=parts["U_residual"].float(),
            S_residual=parts["S_residual"].float().reshape(-1),
            V_residual=parts["V_residual"].float(),
        )
        _check_layer_shapes(path, name, layer)
        layers[name] = layer
    return layers, vision, absent_principal


def _check_layer_shapes(path: Path, name: str, layer: EffortLayer) -> None:
    d_out, d_in = layer.weight_main.shape
    r = layer.S_residual.numel()
    expected = {
        "U_residual": (d_out, r),
        "V_residual": (r, d_in),
    }
    for factor, shape in expected.items():
        got = tuple(getattr(layer, factor).shape)
        if got != shape:
            raise MasmError(
                f"{path}: key 'backbone.{name}.{factor}' has shape {got}, Effort's formula needs {shape} "
                f"(weight_main {d_out}x{d_in}, residual rank {r})"
            )
    if layer.bias is not None and tuple(layer.bias.shape) != (d_out,):
        raise MasmError(
            f"{path}: key 'backbone.{name}.bias' has shape {tuple(layer.bias.shape)}, needs ({d_out},)"
        )


# -- building -----------------------------------------------------------------------------------------------
def _load_plain_backbone(ckpt: EffortCheckpoint, model: nn.Module, backbone: str) -> None:
    """Every vision weight of the file into the plain CLIP tower; adapted layers get Effort's effective
    weight (replaced by the exact factors once the MASM layers are in)."""
    state = dict(ckpt.vision)
    for name, layer in ckpt.layers.items():
        state[f"{name}.weight"] = layer.effective_weight()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    expected = model.state_dict()
    for key, tensor in sorted(state.items()):
        if key not in expected:
            raise MasmError(f"{ckpt.path}: unexpected key 'backbone.{key}' (not a tensor of {backbone})")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise MasmError(
                f"{ckpt.path}: key 'backbone.{key}' has shape {tuple(tensor.shape)}, {backbone} needs "
                f"{tuple(expected[key].shape)} (wrong --backbone?)"
            )
    missing = sorted(k for k in expected if k not in state and not _IGNORED.search(k))
    if missing:
        raise MasmError(f"{ckpt.path}: missing key 'backbone.{missing[0]}' ({len(missing)} missing in all)")
    width = ckpt.head["weight"].shape
    if tuple(width) != (2, int(model.config.hidden_size)) or tuple(ckpt.head["bias"].shape) != (2,):
        raise MasmError(
            f"{ckpt.path}: key 'head.weight' has shape {tuple(width)}, {backbone} needs "
            f"(2, {model.config.hidden_size})"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def _verify_weights(detector: Detector, ckpt: EffortCheckpoint) -> None:
    """Every imported layer's weight equals Effort's formula (to float32 round-off)."""
    layers = dict(masm_layers(detector.backbone))
    with torch.no_grad():
        for name, effort in ckpt.layers.items():
            expected = effort.effective_weight()
            got = layers[_find_layer(layers, name)].merged_weight().float()
            error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
            if error > WEIGHT_TOLERANCE:
                raise RuntimeError(
                    f"imported {name} differs from Effort's formula (relative error {error:.2e})"
                )


def _find_layer(layers: dict[str, nn.Module], effort_name: str) -> str:
    for name in layers:  # the model may nest the tower (transformers 4: vision_model.)
        if name == effort_name or name.endswith("." + effort_name):
            return name
    raise RuntimeError(f"no MASM layer for {effort_name} (target_modules do not match Effort's layers)")


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def _first_line(lines: list[str]) -> str:
    return next((line.strip() for line in lines if line.strip()), "unreadable")

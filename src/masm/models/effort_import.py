"""Import Effort's released detectors (``effort_clip_L14_trainOn_FaceForensic.pth``, its AI-generated image
detectors and the like).

Effort (ICML 2025) is MASM with one rank-1 residual subspace per attention projection, so its checkpoints
become masm detectors that ``masm detect``, ``masm eval``, :func:`~masm.models.load_checkpoint` and
training (as ``model.backbone``: the starting point) accept.

A file is in DeepfakeBench's layout (face detectors: ``backbone.*``, a two-logit ``head.*``) or in
UniversalFakeDetect's (AI-generated images: a whole ``CLIPModel`` under ``model.*``, a one-logit ``fc.*``);
:mod:`~masm.models.effort_layouts` recognises which and names the vision tower's tensors as follows:

* ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight_main, bias, U_residual [d_out,r], S_residual [r],
  V_residual [r,d_in]}``, and ``U_r, S_r, V_r`` (the principal factors, which the forward never uses and
  which are absent from some released files);
* every other CLIP vision tensor as ``CLIPModel.vision_model`` names it (``embeddings.*``,
  ``pre_layrnorm.*``, ``layer_norm1/2``, ``mlp.fc1/fc2``, ``post_layernorm.*``);
* the head, ``weight [n, d]`` and ``bias [n]`` on the ``pooler_output``: two logits (softmax) from
  DeepfakeBench, one (sigmoid) from UniversalFakeDetect, kept as it is.

A UniversalFakeDetect detector (or any, with ``whole_image=True``) is written with whole-image
preprocessing: no face crop; the centre crop at the image's own resolution, sides under 256 pixels
repeated up to it first, as Effort's AI-generated image evaluation.

A projection computes ``x (W_main + U_residual diag(S_residual) V_residual)ᵀ + b``. masm's layer computes
``x (W_sem + U diag(s) Vᵀ)ᵀ + b``, so ``W_sem = W_main``, ``U = U_residual``, ``s = S_residual`` and
``V = V_residualᵀ`` reproduce it exactly (:func:`effort_factor_state` is the one place that knows masm's
parameter names). Written from that specification; no Effort code is used.
"""

from __future__ import annotations

import re
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
from .effort_layouts import read_effort_file
from .methods import method_config
from .preprocessing import FaceCropConfig, Preprocessing, WholeImageConfig

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
    """An Effort checkpoint split into its adapted layers, the other vision tensors and the head.

    ``layout``: ``deepfakebench`` or ``univfd``; ``prefix`` and ``head_prefix``: how the file names the
    vision tower's and the head's keys (``backbone.`` / ``head.``, ``model.vision_model.`` / ``fc.``).
    """

    path: str
    layers: dict[str, EffortLayer]
    vision: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    residual_rank: int
    notes: list[str] = field(default_factory=list)
    layout: str = "deepfakebench"
    prefix: str = "backbone."
    head_prefix: str = "head."

    @property
    def head_logits(self) -> int:
        return int(self.head["weight"].shape[0])


def read_effort_checkpoint(path: str | Path) -> EffortCheckpoint:
    """Read and validate an Effort checkpoint file (``torch.load(weights_only=True)``, or safetensors) of
    either layout (:mod:`~masm.models.effort_layouts`)."""
    path = Path(path)
    found = read_effort_file(path)
    notes = list(found.notes)
    layers, vision, absent_principal = _split_layers(path, found.backbone, found.prefix)
    ranks = {layer.S_residual.numel() for layer in layers.values()}
    if len(ranks) != 1:
        raise MasmError(f"{path}: the residual ranks differ between layers ({sorted(ranks)})")
    if absent_principal:
        notes.append(f"U_r/S_r/V_r absent in {absent_principal} layers (unused by the forward)")
    return EffortCheckpoint(
        str(path),
        layers,
        vision,
        found.head,
        ranks.pop(),
        notes,
        layout=found.layout,
        prefix=found.prefix,
        head_prefix=found.head_prefix,
    )


def effort_detector(
    ckpt: EffortCheckpoint, backbone: str = "clip-vit-l14", *, whole_image: bool | None = None
) -> Detector:
    """The checkpoint as masm's K=1, m=r detector (unmerged), built through masm's public path.

    ``backbone`` names the architecture only (a registry name or a directory with a ``config.json``); every
    weight comes from the file. ``whole_image``: whole-image preprocessing instead of face crops (None:
    for a UniversalFakeDetect file only).
    """
    model, family = build_architecture(backbone)
    if family.name != "clip":
        raise MasmError(
            f"Effort checkpoints hold a CLIP vision tower; --backbone {backbone} is a {family.name} model"
        )
    _load_plain_backbone(ckpt, model, backbone)
    if whole_image is None:
        whole_image = ckpt.layout == "univfd"
    preprocessing = effort_preprocessing(family.input_size(model), whole_image)
    method = method_config("effort", {"masm": {"subspace_rank": ckpt.residual_rank}})
    loaded = LoadedBackbone(model, family, preprocessing)
    # The SVD that apply_masm makes is replaced right away: cache nothing.
    detector = build_detector(loaded, backbone, method, cache_dir=False, head_logits=ckpt.head_logits)
    detector.load_state_dict({f"head.{k}": v.float() for k, v in ckpt.head.items()}, strict=False)
    factors = effort_factor_state(detector, ckpt)
    result = detector.load_state_dict(factors, strict=False)
    if result.unexpected_keys:  # masm's layer no longer has the parameters the mapping names
        raise RuntimeError(f"effort_factor_state is out of date: {result.unexpected_keys[0]!r}")
    _verify_weights(detector, ckpt)
    return detector.eval()


def effort_preprocessing(input_size: int, whole_image: bool) -> Preprocessing:
    """Effort's test-time input at ``input_size``, CLIP's mean and std: the aligned face crop
    (DeepfakeBench), or the whole image's centre crop without resizing, a side under 256 pixels repeated
    up to it first (its UniversalFakeDetect evaluation)."""
    if not whole_image:
        return Preprocessing(input_size=input_size, face_crop=FaceCropConfig())
    crop = WholeImageConfig(test="center_crop", small_side=max(256, input_size))
    return Preprocessing(input_size=input_size, face_crop=None, whole_image=crop)


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
    ckpt_path: str | Path,
    out: str | Path,
    backbone: str = "clip-vit-l14",
    *,
    whole_image: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the Effort checkpoint ``ckpt_path`` as a masm checkpoint directory at ``out`` (merged weights:
    plain CLIP Linears, loadable without the MASM code path). Returns the directory and its import info.
    ``whole_image``: as :func:`effort_detector`."""
    ckpt = read_effort_checkpoint(ckpt_path)
    detector = effort_detector(ckpt, backbone, whole_image=whole_image)
    info = {
        "imported_from": {
            "format": "effort",
            "layout": ckpt.layout,
            "file": str(Path(ckpt_path).resolve()),
            "sha256": file_sha256(Path(ckpt_path)),
            "adapted_layers": len(ckpt.layers),
            "residual_rank": ckpt.residual_rank,
            "head_logits": ckpt.head_logits,
            "whole_image": detector.preprocessing.face_crop is None,
            "notes": ckpt.notes,
        }
    }
    detector.merge()
    return save_checkpoint(detector, out, merged=True, info=info), info


# -- reading ------------------------------------------------------------------------------------------------
def _split_layers(path: Path, backbone: dict[str, torch.Tensor], prefix: str):
    if not any(key.endswith(".weight_main") for key in backbone):
        raise MasmError(
            f"{path}: not an Effort checkpoint (no SVD layers {prefix}encoder.layers.N.self_attn.*_proj."
            "weight_main)"
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
                raise MasmError(f"{path}: missing key '{prefix}{name}.{factor}'")
        unknown = sorted(set(parts) - set(_FACTORS) - _UNUSED - {"bias"})
        if unknown:
            raise MasmError(f"{path}: unexpected key '{prefix}{name}.{unknown[0]}'")
        absent_principal += not (_UNUSED & set(parts))
        layer = EffortLayer(
            weight_main=parts["weight_main"].float(),
            bias=parts["bias"].float() if "bias" in parts else None,
            U_residual=parts["U_residual"].float(),
            S_residual=parts["S_residual"].float().reshape(-1),
            V_residual=parts["V_residual"].float(),
        )
        _check_layer_shapes(path, prefix + name, layer)
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
                f"{path}: key '{name}.{factor}' has shape {got}, Effort's formula needs {shape} "
                f"(weight_main {d_out}x{d_in}, residual rank {r})"
            )
    if layer.bias is not None and tuple(layer.bias.shape) != (d_out,):
        raise MasmError(f"{path}: key '{name}.bias' has shape {tuple(layer.bias.shape)}, needs ({d_out},)")


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
            raise MasmError(f"{ckpt.path}: unexpected key '{ckpt.prefix}{key}' (not a tensor of {backbone})")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise MasmError(
                f"{ckpt.path}: key '{ckpt.prefix}{key}' has shape {tuple(tensor.shape)}, {backbone} needs "
                f"{tuple(expected[key].shape)} (wrong --backbone?)"
            )
    missing = sorted(k for k in expected if k not in state and not _IGNORED.search(k))
    if missing:
        raise MasmError(
            f"{ckpt.path}: missing key '{ckpt.prefix}{missing[0]}' ({len(missing)} missing in all)"
        )
    shape, needed = tuple(ckpt.head["weight"].shape), (ckpt.head_logits, int(model.config.hidden_size))
    if shape != needed:
        raise MasmError(
            f"{ckpt.path}: key '{ckpt.head_prefix}weight' has shape {shape}, {backbone} needs {needed}"
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

"""A deepfake detector: a vision backbone, a fine-tuning method and a linear head of two logits (softmax,
cross-entropy) or one (sigmoid, binary cross-entropy, as UniversalFakeDetect's detectors), built on a
backbone already in memory (from a name or a checkpoint directory: :mod:`~masm.models.factory`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import MasmError, SettingsError
from .backbone_loading import LoadedBackbone
from .calibration import Calibration
from .families import BackboneFamily, family_of
from .fingerprint import backbone_fingerprint
from .methods import MethodConfig, apply_method, merge_method, method_config, resolve_targets
from .preprocessing import Preprocessing

# A head's logit count when nothing decides otherwise (every checkpoint written before the choice existed).
DEFAULT_HEAD_LOGITS = 2


@dataclass
class ModelConfig:
    """What a detector is made of; saved in every checkpoint."""

    backbone: str = field(
        default="clip-vit-l14", metadata={"help": "registry name, hub id or local directory"}
    )
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "fine-tuning method"})
    preprocessing: Preprocessing | None = field(
        default=None, metadata={"help": "input size, mean/std and face crop; null = the backbone's defaults"}
    )
    head_logits: int | None = field(
        default=None,
        metadata={
            "help": "logits of the head: 2 (P(fake) by softmax, cross-entropy loss) or 1 (P(fake) by sigmoid, "
            "binary cross-entropy, as UniversalFakeDetect's detectors); null = 2, or as many as the head of "
            "the masm checkpoint named as backbone"
        },
    )

    def __post_init__(self):
        if self.head_logits is not None and self.head_logits not in (1, 2):
            raise SettingsError(
                ["head_logits"],
                f"a head has 1 logit (sigmoid) or 2 (softmax), got {self.head_logits}",
            )


class Detector(nn.Module):
    """``logits = head(f)`` with ``f`` the backbone family's pooled feature (L2-normalised when the method
    says so); P(fake) = ``softmax(logits)[:, 1]`` for two logits, ``sigmoid(logit)`` for one
    (:func:`fake_probability`)."""

    def __init__(
        self,
        backbone: nn.Module,
        config: ModelConfig,
        preprocessing: Preprocessing,
        fingerprint: str,
        family: BackboneFamily | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.family = family or family_of(backbone)
        self.head = nn.Linear(self.family.feature_dim(backbone), config.head_logits or DEFAULT_HEAD_LOGITS)
        self.config = config
        self.preprocessing = preprocessing
        self.backbone_fingerprint = fingerprint
        self.merged = False
        # what the scores mean and where to decide (masm calibrate); None: raw scores, decided at 0.5
        self.calibration: Calibration | None = None
        self._last_features: torch.Tensor | None = None  # the batch's feature, kept in training only

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The family's pooled feature (``pooler_output``), before any normalisation."""
        return self.family.pooled(self.backbone, pixel_values)

    def head_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feature = self.features(pixel_values)
        if self.config.method.features.l2_normalize:
            feature = F.normalize(feature.float(), dim=-1).to(feature.dtype)
        return feature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feature = self.head_input(pixel_values)
        self._last_features = feature if self.training else None
        return self.head(feature)

    def auxiliary_losses(self, labels: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """``{name: (weight, value)}`` of the feature losses the method enables, on the last training
        batch's head input (GenD's alignment and uniformity on the hypersphere); empty when none is on."""
        settings = self.config.method.features
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        feature = self._last_features
        if feature is None or not (settings.lambda_align or settings.lambda_uniform):
            return terms
        feature = feature.float()
        if settings.lambda_align:
            terms["align"] = (settings.lambda_align, alignment_loss(feature, labels))
        if settings.lambda_uniform:
            terms["uniform"] = (settings.lambda_uniform, uniformity_loss(feature, settings.uniform_t))
        return terms

    @property
    def head_logits(self) -> int:
        return self.head.out_features

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """P(fake) per image."""
        return fake_probability(self.forward(pixel_values))

    def merge(self) -> Detector:
        """Fold adapters into plain Linears (in place): inference at exactly the plain backbone's speed."""
        merge_method(self.backbone)
        self.family.finalize_merged(self.backbone)
        self.merged = True
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor and the head's, under its checkpoint name (what a checkpoint saves).

        A MASM layer's factors are listed under the layer's own name (``….q_proj.U``), as rows of its
        group's Parameters, where :meth:`trainable_parameters` has the groups' stacked tensors.
        """
        return {
            name: tensor
            for name, tensor in self.state_dict(keep_vars=True).items()
            if tensor.requires_grad or name.startswith("head.")
        }

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def build_detector(
    loaded: LoadedBackbone,
    name: str,
    method: str | MethodConfig,
    *,
    preprocessing: Preprocessing | None = None,
    cache_dir=None,
    seed: int | None = 0,
    head_logits: int | None = None,
) -> Detector:
    """:func:`~masm.models.create_detector` on a backbone already in memory (``name`` is what the config records)."""
    method_cfg = method_config(method) if isinstance(method, str) else method
    method_cfg = resolve_targets(method_cfg, loaded.family)
    model = loaded.model
    fingerprint = backbone_fingerprint(model)
    pre = preprocessing or loaded.preprocessing
    logits = _head_logits(head_logits, loaded, name)
    config = ModelConfig(backbone=name, method=method_cfg, preprocessing=pre, head_logits=logits)
    model = apply_method(loaded.family.prepare(model), method_cfg, cache_dir=cache_dir)
    if seed is None:
        detector = Detector(model, config, pre, fingerprint, loaded.family)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            detector = Detector(model, config, pre, fingerprint, loaded.family)
    if loaded.head is not None:  # a masm checkpoint as the starting point: its head too
        detector.head.load_state_dict(copy.deepcopy(loaded.head))
    return detector


def _head_logits(requested: int | None, loaded: LoadedBackbone, name: str) -> int:
    """The head's logit count: as requested, else that of the head a masm checkpoint starts from, else 2."""
    if loaded.head is None:
        return requested or DEFAULT_HEAD_LOGITS
    start = int(loaded.head["weight"].shape[0])
    if requested is not None and requested != start:
        raise MasmError(
            f"model.head_logits is {requested}, but the checkpoint {name} starts from a {start}-logit head: "
            f"set model.head_logits: {start} (or null)"
        )
    return start


def fake_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(fake) from a head's logits, in float32: the softmax's fake entry for two logits (computed exactly as
    masm always has, so two-logit scores do not move), the sigmoid of the logit for one."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0])
    return logits.softmax(-1)[:, 1]


def alignment_loss(feature: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the (normalised) features of same-label pairs (0 when there are none)."""
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    if not bool(same.any()):
        return feature.sum() * 0.0
    return _squared_distances(feature)[same].mean()


def uniformity_loss(feature: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """``log mean_{i<j} exp(-t ‖f_i − f_j‖²)``: low when the features spread over the sphere."""
    n = feature.shape[0]
    if n < 2:
        return feature.sum() * 0.0
    pair = torch.ones(n, n, dtype=torch.bool, device=feature.device).triu(diagonal=1)
    return _squared_distances(feature)[pair].mul(-t).exp().mean().log()


def _squared_distances(feature: torch.Tensor) -> torch.Tensor:
    # From the Gram matrix: smooth where two features coincide (cdist's backward is not).
    norms = feature.pow(2).sum(-1)
    return (norms[:, None] + norms[None, :] - 2 * feature @ feature.T).clamp_min(0)


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")

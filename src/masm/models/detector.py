"""A deepfake detector: a vision backbone, a fine-tuning method and a 2-way linear head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import from_dict
from .backbones import backbone_fingerprint, backbone_preprocessing, load_backbone
from .methods import MethodConfig, apply_method, merge_method, method_config
from .preprocessing import Preprocessing


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


class Detector(nn.Module):
    """``logits = head(backbone(pixels).pooler_output)``; P(fake) = ``softmax(logits)[:, 1]``."""

    def __init__(
        self, backbone: nn.Module, config: ModelConfig, preprocessing: Preprocessing, fingerprint: str
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 2)
        self.config = config
        self.preprocessing = preprocessing
        self.backbone_fingerprint = fingerprint
        self.merged = False

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).pooler_output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """P(fake) per image."""
        return self.forward(pixel_values).float().softmax(-1)[:, 1]

    def merge(self) -> Detector:
        """Fold adapters into plain Linears (in place): inference at exactly the plain backbone's speed."""
        merge_method(self.backbone)
        self.merged = True
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def create_detector(
    backbone: str = "clip-vit-l14",
    method: str | MethodConfig = "masm",
    *,
    preprocessing: Preprocessing | None = None,
    cache_dir=None,
    seed: int | None = 0,
) -> Detector:
    """The one way to build a detector: load the backbone, apply the method, add a fresh head.

    ``method`` is a preset name (``masm``, ``effort``, ``effort-reg``, ``lora``, ``full``, ``linear``) or a
    :class:`MethodConfig`. ``seed`` makes the head's initialisation reproducible.
    """
    method_cfg = method_config(method) if isinstance(method, str) else method
    model = load_backbone(backbone)
    fingerprint = backbone_fingerprint(model)
    pre = preprocessing or backbone_preprocessing(model)
    config = ModelConfig(backbone=backbone, method=method_cfg, preprocessing=pre)
    model = apply_method(model, method_cfg, cache_dir=cache_dir)
    if seed is None:
        detector = Detector(model, config, pre, fingerprint)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            detector = Detector(model, config, pre, fingerprint)
    return detector


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")

"""Models: backbone registry, fine-tuning methods, the detector and its checkpoints."""

from .backbones import BACKBONES, load_backbone, resolve_backbone
from .checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from .detector import Detector, ModelConfig, create_detector
from .methods import METHODS, MethodConfig, apply_method, method_config
from .preprocessing import FaceCropConfig, Preprocessing

__all__ = [
    "BACKBONES",
    "METHODS",
    "Detector",
    "FaceCropConfig",
    "MethodConfig",
    "ModelConfig",
    "Preprocessing",
    "apply_method",
    "create_detector",
    "load_backbone",
    "load_checkpoint",
    "method_config",
    "read_checkpoint_config",
    "resolve_backbone",
    "save_checkpoint",
]

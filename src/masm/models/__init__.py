"""Models: backbone registry, fine-tuning methods, the detector and its checkpoints."""

from .backbones import BACKBONES, resolve_backbone
from .checkpoint import read_checkpoint_config, save_checkpoint
from .detector import Detector, ModelConfig
from .factory import create_detector, load_backbone, load_checkpoint
from .methods import METHODS, MethodConfig, apply_method, method_config
from .preprocessing import FaceCropConfig, Preprocessing, WholeImageConfig

__all__ = [
    "BACKBONES",
    "METHODS",
    "Detector",
    "FaceCropConfig",
    "MethodConfig",
    "ModelConfig",
    "Preprocessing",
    "WholeImageConfig",
    "apply_method",
    "create_detector",
    "load_backbone",
    "load_checkpoint",
    "method_config",
    "read_checkpoint_config",
    "resolve_backbone",
    "save_checkpoint",
]

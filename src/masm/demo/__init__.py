"""The offline demo: everything ``masm demo`` needs on a machine that cannot download a pretrained CLIP.

:mod:`masm.demo.pretrain` builds the demo backbone (registry name ``demo-clip``): a small CLIP vision tower
pretrained self-supervised on real photo crops, so that MASM's premise (frozen pretrained principal
directions, artifacts learned in residual subspaces) is exercised on a backbone that has structure;
:mod:`masm.demo.pretrain_data` makes the real photo crops it is pretrained on.
"""

from .pretrain import DEMO_BACKBONE_CONFIG, pretrain_demo_backbone
from .pretrain_data import real_photo_crops

__all__ = ["DEMO_BACKBONE_CONFIG", "pretrain_demo_backbone", "real_photo_crops"]

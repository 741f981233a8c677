"""The methods ``masm bench speed`` times, the settings of a run, and how each method's detector is built.

``masm`` and ``effort`` are the method registry's own; the other rows are benchmark-only variants built
here (``effort-reference``, ``fmsd`` with fixed layers, ``masm-path-only``, ``frozen-floor``): see the
package's documentation for what each one measures.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_METHODS = [
    "masm",
    "fmsd",
    "effort-reference",
    "effort",
    "lora",
    "full",
    "frozen-floor",
    "masm-path-only",
]


@dataclass
class SpeedSettings:
    """What every method of one run shares: backbone, batch, steps, device and how the step runs."""

    backbone: str = "clip-vit-b16-random"
    batch_size: int = 8
    steps: int = 5
    warmup: int = 2
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    precision: str = "auto"  # as the trainer's: bf16 autocast on CUDA, fp32 on CPU (TF32 matmuls on CUDA)
    compile: bool = False  # each method's model through torch.compile (as training's compile: true)
    cuda_graph: bool = False  # each method's whole step captured as a CUDA graph (training's cuda_graph)


def _build(method: str, settings: SpeedSettings):
    """``(detector, its MASMConfig or None)`` of ``method`` on ``settings.backbone``."""
    from masm.method.apply import find_targets
    from masm.models import create_detector

    from ..effort_reference import apply_effort_reference

    if method == "effort-reference":
        detector = create_detector(settings.backbone, "linear")
        apply_effort_reference(detector.backbone, detector.family.attention_targets)
        return detector, None
    if method == "masm-path-only":
        from masm.models.methods import method_config

        bare = {"semantic_guard": "off", "lambda_orth": 0.0, "lambda_spec": 0.0, "mask": {"enabled": False}}
        detector = create_detector(settings.backbone, method_config("masm", {"masm": bare}))
        return detector, detector.config.method.masm_config
    if method == "fmsd":
        from masm.models.methods import method_config

        plain = create_detector(settings.backbone, "linear")
        config = method_config("fmsd")
        names = [n for n, _ in find_targets(plain.backbone, plain.config.method.masm.target_modules)]
        config.masm.select.layers = spread_evenly(names, config.masm.select.fraction)
        detector = create_detector(settings.backbone, config)
        return detector, detector.config.method.masm_config
    if method == "frozen-floor":
        detector = create_detector(settings.backbone, "linear")
        for _, linear in find_targets(detector.backbone, detector.family.attention_targets):
            if linear.bias is not None:  # e.g. DINOv3's k_proj has none
                linear.bias.requires_grad_(True)
        return detector, None
    detector = create_detector(settings.backbone, method)
    return detector, detector.config.method.masm_config


def spread_evenly(names: list[str], fraction: float) -> list[str]:
    """``ceil(fraction · L)`` of ``names`` (at least one) at even spacing, the first one included."""
    import math

    keep = max(1, math.ceil(fraction * len(names)))
    return [names[i * len(names) // keep] for i in range(keep)]

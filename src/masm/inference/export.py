"""Export a detector for deployment: a merged checkpoint, or ONNX.

``merged``: plain backbone weights with the adapters folded in, plus the head, as a checkpoint directory
that :func:`masm.models.load_checkpoint` (and ``masm detect``) loads without the MASM code path.

``onnx``: the merged detector traced by ``torch.onnx.export`` with the TorchScript exporter
(``dynamo=False``). Both exporters handle the transformers CLIP tower with torch 2.13 and give the same
outputs (checked to 1e-7 on the tiny model); the TorchScript one is chosen because it is several times
faster (about 1 s vs 6 s on the tiny model) and needs no onnxscript. Input ``pixel_values``
(N, 3, S, S) float32 with a dynamic batch axis, output ``logits`` (N, 2); P(fake) = softmax(logits)[:, 1].
The preprocessing (input size, mean, std, face crop) is written beside the model as
``<name>.preprocessing.json``, and the exported graph is checked against PyTorch with onnxruntime.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from masm.config import to_dict
from masm.errors import MasmError
from masm.models import Detector, load_checkpoint, save_checkpoint

DEFAULT_OPSET = 17
ONNX_TOLERANCE = 1e-4


def _merged_detector(model: Detector | str | Path) -> Detector:
    if isinstance(model, Detector):
        return model if model.merged else copy.deepcopy(model).merge()
    return load_checkpoint(model, device="cpu", merge=True)


def export_merged(model: Detector | str | Path, out: str | Path) -> Path:
    """Write the merged checkpoint of ``model`` (a detector or a checkpoint directory) to ``out``."""
    return save_checkpoint(_merged_detector(model), out, merged=True, info={"exported_as": "merged"})


def preprocessing_path(onnx_path: str | Path) -> Path:
    """Where the input contract of ``onnx_path`` is written: ``model.onnx`` -> ``model.preprocessing.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".preprocessing.json")


def export_onnx(
    model: Detector | str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Export the merged detector to ONNX at ``out`` and its preprocessing beside it.

    Returns ``{"onnx", "preprocessing", "opset", "max_abs_diff"}``; ``max_abs_diff`` (the largest logit
    difference to PyTorch on a batch other than the traced one) is ``None`` when onnxruntime is not
    installed or ``verify`` is off. A difference above ``tolerance`` is a :class:`MasmError`.
    """
    detector = _merged_detector(model).cpu().float().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = detector.preprocessing.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        _torch_export(detector, example, out, opset)
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as err:
        raise MasmError(f"ONNX export failed at opset {opset}: {err}") from None
    contract = {
        "input": "pixel_values",
        "output": "logits",
        "layout": "NCHW float32 RGB, values (pixel / 255 - mean) / std",
        "score": "softmax(logits)[:, 1] = P(fake)",
        "preprocessing": to_dict(detector.preprocessing),
    }
    pre_path = preprocessing_path(out)
    pre_path.write_text(json.dumps(contract, indent=1))
    report: dict[str, Any] = {"onnx": str(out), "preprocessing": str(pre_path), "opset": opset}
    report["max_abs_diff"] = verify_onnx(detector, out, tolerance) if verify else None
    return report


def _torch_export(detector: Detector, example: torch.Tensor, out: Path, opset: int) -> None:
    names = dict(input_names=["pixel_values"], output_names=["logits"], opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about CLIP's Python-level shape checks (constant for a fixed input size) and
        # torch about the TorchScript exporter being legacy; neither concerns the user.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                detector,
                (example,),
                str(out),
                dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
                **names,
            )
        except TypeError:  # a torch without the TorchScript exporter: use the dynamo one
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                detector,
                (example,),
                str(out),
                dynamic_shapes={"pixel_values": {0: batch}},
                dynamo=True,
                **names,
            )


def verify_onnx(detector: Detector, onnx_path: str | Path, tolerance: float = ONNX_TOLERANCE) -> float | None:
    """Largest |logit difference| between onnxruntime and PyTorch on a batch of 3; ``None`` without ORT."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    size = detector.preprocessing.input_size
    batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = detector(batch).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": batch.numpy()})
    diff = float(abs(got - expected).max())
    if not diff <= tolerance:
        raise MasmError(f"{onnx_path}: ONNX logits differ from PyTorch by {diff:.3g} (> {tolerance:g})")
    return diff

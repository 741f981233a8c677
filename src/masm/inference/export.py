"""Export a detector for deployment: a merged checkpoint, or ONNX that carries its own preprocessing.

``merged``: plain backbone weights with the adapters folded in, plus the head, as a checkpoint directory
that :func:`masm.models.load_checkpoint` (and ``masm detect``) loads without the MASM code path.

``onnx``: one graph from the image as the user has it to the score. Input ``image``: uint8 RGB
(N, H, W, 3), any H and W (a batch shares one size; one image is ``image[None]``). Outputs ``logits``
(N, 2), ``raw_score`` (N,) = softmax(logits)[:, 1] = the network's P(fake), and ``score`` (N,) =
``sigmoid((l_fake - l_real) / T)``, the calibrated P(fake) with the detector's stored temperature ``T``
(1 when none is stored); the stored operating points' thresholds are in the metadata (``masm.input_contract``,
key ``calibration``), to be compared with ``score``. Everything ``masm detect --no-face`` does to
an image after decoding it happens inside the graph, exactly as :func:`masm.data.transforms.resize_square`
and :class:`masm.data.transforms.FrameTransform` do it (a whole-image detector whose test policy is
``center_crop`` instead takes its centre crop unresized, as :func:`masm.data.whole_image.center_crop`
does, and one whose policy is ``tiles`` is refused):

- resize the short side to the input size S: new size ``max(S, round(side * S / min(H, W)))`` per side
  (Python's round, half to even; computed in float64 as Python does), OpenCV's INTER_AREA when
  shrinking and INTER_CUBIC when enlarging, on the uint8 image, the result rounded back to uint8;
- centre crop to S x S (top ``(new_h - S) // 2``, left ``(new_w - S) // 2``);
- float32 ``(pixel - 255 * mean) / (255 * std)``, NCHW.

How OpenCV's interpolations are written as ONNX nodes: :mod:`masm.inference.onnx_graph`.

The preprocessing (input size, mean, std, face crop) and the input contract are also in the model's
metadata (``metadata_props``) and beside it as ``<name>.preprocessing.json``. The detector part is
traced by ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: several times faster
than the dynamo one and no onnxscript needed; both give the same outputs); the preprocessing nodes are
written with ``onnx.helper``. The export is checked with onnxruntime against the PyTorch path of
``masm detect`` on images smaller and larger than S.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masm import __version__
from masm.config import to_dict
from masm.errors import MasmError
from masm.models import Detector, load_checkpoint, save_checkpoint
from masm.models.calibration import log_odds_of_logits

from .onnx_graph import check_exportable, prepend_preprocessing

DEFAULT_OPSET = 17
# Squeeze and Unsqueeze take their axes as an input from opset 13 on, as the preprocessing nodes write them.
MIN_OPSET = 13
ONNX_TOLERANCE = 1e-4
# Image sizes (H, W) the export is checked on, as multiples of the input size S: smaller, larger, exact 2x.
VERIFY_SIZES = ((0.75, 1.3), (2.0, 2.0), (1.7, 1.1))


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


def input_contract(detector: Detector) -> dict[str, Any]:
    """What the exported graph takes and gives, and what it does in between (also its metadata)."""
    return {
        "input": "image",
        "input_format": "uint8 RGB, N x H x W x 3, any H and W (one image: image[None])",
        "outputs": {
            "logits": "N x 2 (N x 1 for a one-logit head)",
            "score": "N, calibrated P(fake) = sigmoid(log_odds / temperature)",
            "raw_score": "N, the network's P(fake) = sigmoid(log_odds)",
            "log_odds": "logits[:, 1] - logits[:, 0] (two logits) or logits[:, 0] (one)",
        },
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "decision": (
            "label fake when score >= the threshold of an operating point in calibration.operating_points "
            f"(default: {detector.calibration.default})"
            if detector.calibration and detector.calibration.default
            else "no operating point stored: score >= 0.5 is the uncalibrated default"
        ),
        "in_graph": [
            *_geometry_steps(detector.preprocessing),
            "float32 (pixel - 255 * mean) / (255 * std), NCHW",
        ],
        "not_in_graph": (
            "face detection and alignment: give aligned face crops of face_crop.size pixels (masm preprocess)"
            if detector.preprocessing.face_crop is not None
            else "nothing: the model was trained on whole images"
        ),
        "preprocessing": to_dict(detector.preprocessing),
    }


def _geometry_steps(preprocessing) -> list[str]:
    """How the graph turns an image of any size into the S x S input, in words."""
    size, whole = preprocessing.input_size, preprocessing.whole_image
    if whole is not None and whole.test == "center_crop":
        small = whole.small_side
        return [
            f"centre crop {size} x {size}, no resize: rows (top + k) % H, columns (left + k) % W, "
            f"k < {size}, top = (max(H, {small}) - {size}) // 2, left = (max(W, {small}) - {size}) // 2 "
            f"(a side under {small} is repeated periodically up to {small})"
        ]
    return [
        f"resize the short side to {size}: new side = max({size}, round(side * {size} / min(H, W))), "
        "OpenCV INTER_AREA when shrinking, INTER_CUBIC when enlarging, rounded to uint8",
        f"centre crop {size} x {size}: top = (new_h - {size}) // 2, left = (new_w - {size}) // 2",
    ]


def export_onnx(
    model: Detector | str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Export the merged detector, preprocessing included, to ONNX at ``out``; its contract beside it.

    Returns ``{"onnx", "preprocessing", "opset", "max_abs_diff"}``; ``max_abs_diff`` (the largest score
    difference to ``masm detect``'s PyTorch path on images of several sizes) is ``None`` when onnxruntime
    is not installed or ``verify`` is off. A difference above ``tolerance`` is a :class:`MasmError`.
    """
    try:
        import onnx
    except ImportError:
        raise MasmError("ONNX export needs the onnx package: pip install 'masm[export]'") from None
    if opset < MIN_OPSET:
        raise MasmError(f"--opset must be at least {MIN_OPSET} (got {opset})")
    detector = _merged_detector(model).cpu().float().eval()
    check_exportable(detector.preprocessing)  # before the (slow) trace
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = detector.preprocessing.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "detector.onnx"
        try:
            _torch_export(detector, example, traced, opset)
        except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as err:
            raise MasmError(f"ONNX export failed at opset {opset}: {err}") from None
        graph_model = onnx.load(str(traced))
    contract = input_contract(detector)
    with torch.no_grad():
        n_logits = int(detector(example[:1]).shape[-1])
    prepend_preprocessing(graph_model, detector, n_logits)
    for key, value in (("masm.input_contract", json.dumps(contract)), ("masm.version", __version__)):
        entry = graph_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(out))
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


def calibrated_scores(detector: Detector, pixel_values: torch.Tensor) -> torch.Tensor:
    """Calibrated P(fake) of preprocessed inputs, as ``masm detect`` computes it (float64)."""
    log_odds = log_odds_of_logits(detector(pixel_values)).double()
    return torch.sigmoid(log_odds / (detector.calibration.temperature if detector.calibration else 1.0))


def onnx_scores(onnx_path: str | Path, images: list[np.ndarray], output: str = "score") -> np.ndarray:
    """Calibrated P(fake) (``output="raw_score"``: the network's) of each uint8 RGB (H, W, 3) image by the
    exported graph alone (onnxruntime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.array([session.run([output], {"image": image[None]})[0][0] for image in images])


def verify_onnx(detector: Detector, onnx_path: str | Path, tolerance: float = ONNX_TOLERANCE) -> float | None:
    """Largest |score difference| between the exported graph and ``masm detect``'s PyTorch path (decoded
    image -> :class:`FrameTransform` -> detector) on random images of :data:`VERIFY_SIZES`; ``None``
    without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from masm.data.transforms import build_transform

    size = detector.preprocessing.input_size
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (max(1, round(h * size)), max(1, round(w * size)), 3), dtype=np.uint8)
        for h, w in VERIFY_SIZES
    ]
    transform = build_transform(detector.preprocessing, train=False)
    with torch.no_grad():
        expected = calibrated_scores(detector, torch.stack([transform(image) for image in images])).numpy()
    diff = float(abs(onnx_scores(onnx_path, images) - expected).max())
    if not diff <= tolerance:
        raise MasmError(f"{onnx_path}: ONNX scores differ from PyTorch by {diff:.3g} (> {tolerance:g})")
    return diff

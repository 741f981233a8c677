"""``masm export``: merged checkpoints and ONNX that matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from masm.inference import export_merged, export_onnx
from masm.inference.export import preprocessing_path
from masm.models import FaceCropConfig, Preprocessing, create_detector, load_checkpoint, save_checkpoint


def trained_tiny():
    """tiny-clip with perturbed adapters, so that merging really changes the backbone's weights."""
    detector = create_detector(
        "tiny-clip", "masm", preprocessing=Preprocessing(input_size=32, face_crop=FaceCropConfig(size=128))
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for p in detector.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return detector.eval()


def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    detector = trained_tiny()
    checkpoint = save_checkpoint(detector, tmp_path / "ckpt")
    report = export_onnx(checkpoint, tmp_path / "onnx" / "detector.onnx")
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] <= 1e-4

    session = ort.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("pixel_values", "logits")
    assert inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            expected = detector(x).numpy()  # the unmerged adapter model: merging must not change outputs
        np.testing.assert_allclose(got, expected, atol=1e-4)

    contract = json.loads(preprocessing_path(report["onnx"]).read_text())
    assert contract["preprocessing"]["input_size"] == 32
    assert contract["preprocessing"]["face_crop"] == {"size": 128, "scale": 1.3}
    assert len(contract["preprocessing"]["mean"]) == 3


def test_merged_export_loads_as_plain_backbone(tmp_path):
    detector = trained_tiny()
    out = export_merged(detector, tmp_path / "merged")
    assert not detector.merged
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == "merged"
    loaded = load_checkpoint(out)
    assert type(loaded.backbone).__name__ == "CLIPVisionModel"
    assert all(type(m) is torch.nn.Linear for n, m in loaded.named_modules() if n.endswith(("fc1", "q_proj")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), detector(x), atol=1e-5, rtol=0)
    assert loaded.preprocessing == detector.preprocessing


def test_export_cli(tmp_path):
    from masm.cli.main import main

    checkpoint = save_checkpoint(trained_tiny(), tmp_path / "ckpt")
    argv = ["export", str(checkpoint), "--format", "merged", "--out", str(tmp_path / "m")]
    assert main(argv) == 0 and (tmp_path / "m" / "model.safetensors").is_file()

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


# Image sizes (H, W) for an input size of 32: enlarged (INTER_CUBIC), already 32 on the short side, shrunk
# (INTER_AREA) by non-integer factors, exactly 2x (OpenCV's half-up fast path), 3x by 2x, 4x, and a photo.
SIZES = [
    (20, 27),
    (27, 20),
    (32, 32),
    (32, 50),
    (45, 33),
    (64, 64),
    (96, 64),
    (128, 200),
    (100, 150),
    (480, 640),
]


def _images(folder, sizes=SIZES):
    """Noisy and smooth PNGs of each size: smooth images put many area means near a half."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(3)
    paths = []
    for h, w in sizes:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for kind, image in (("noise", noise), ("smooth", cv2.GaussianBlur(noise, (0, 0), 2))):
            paths.append(folder / f"{h}x{w}-{kind}.png")
            Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from masm.cli.main import main

    root = tmp_path_factory.mktemp("onnx")
    checkpoint = save_checkpoint(trained_tiny(), root / "ckpt")
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(root / "detector.onnx")]) == 0
    return checkpoint, root / "detector.onnx"


def test_onnx_scores_images_of_any_size_as_masm_detect_does(exported, tmp_path):
    """The exported graph alone (onnxruntime, images as PIL decodes them) gives masm detect's scores."""
    import onnxruntime as ort
    from PIL import Image

    from masm.cli.main import main

    checkpoint, onnx_path = exported
    paths = _images(tmp_path)
    out = tmp_path / "detect.jsonl"
    assert main(["detect", str(checkpoint), *map(str, paths), "--no-face", "--out", str(out)]) == 0
    detect = {r["input"]: r["score"] for r in map(json.loads, out.read_text().splitlines())}
    assert len(detect) == len(paths)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and image_input.type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["logits", "score", "raw_score"]
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        (score,) = session.run(["score"], {"image": rgb[None]})
        assert abs(float(score[0]) - detect[str(path)]) <= 1e-4, path.name
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:2]])  # one size, two images
    (scores,) = session.run(["score"], {"image": batch})
    np.testing.assert_allclose(scores, [detect[str(p)] for p in paths[:2]], atol=1e-4)


def test_onnx_resize_crop_and_normalise_equal_opencv_pixel_for_pixel(exported, tmp_path):
    """What the graph hands the detector equals FrameTransform's tensor (cv2.resize inside) exactly."""
    import onnx
    import onnxruntime as ort
    from PIL import Image

    from masm.data.transforms import build_transform

    _, onnx_path = exported
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.ValueInfoProto(name="pixel_values"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    transform = build_transform(trained_tiny().preprocessing, train=False)
    extra = [(65, 129), (77, 131), (66, 70), (300, 257), (16, 200), (64, 34), (34, 64)]
    for path in _images(tmp_path, SIZES + extra):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        (pixels,) = session.run(["pixel_values"], {"image": rgb[None]})
        np.testing.assert_array_equal(pixels[0], transform(rgb).numpy(), err_msg=path.name)


def test_onnx_metadata_states_the_contract(exported):
    import onnx

    _, onnx_path = exported
    contract = json.loads(preprocessing_path(onnx_path).read_text())
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(metadata["masm.input_contract"]) == contract
    assert contract["input"] == "image" and contract["input_format"].startswith("uint8 RGB, N x H x W x 3")
    assert contract["preprocessing"]["input_size"] == 32
    assert contract["preprocessing"]["face_crop"] == {"size": 128, "scale": 1.3}
    assert any(
        "INTER_AREA when shrinking, INTER_CUBIC when enlarging" in step for step in contract["in_graph"]
    )
    assert "aligned face crops" in contract["not_in_graph"]


def test_onnx_export_refuses_an_old_opset(tmp_path):
    from masm.errors import MasmError

    with pytest.raises(MasmError, match="--opset must be at least 13"):
        export_onnx(trained_tiny(), tmp_path / "d.onnx", opset=11)


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

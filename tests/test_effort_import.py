"""``masm import effort``: Effort's released checkpoints as masm detectors (issue 11).

Test checkpoints are built in Effort's key layout from the tiny CLIP, with and without the ``module.``
prefix and the unused ``U_r/S_r/V_r`` keys, with the residual factors moved away from their SVD values. The
reference is a forward written from Effort's formula, independent of masm's layer.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from masm.cli.main import main
from masm.errors import MasmError
from masm.models import create_detector, load_backbone, load_checkpoint
from masm.models.backbones import BACKBONES
from masm.models.effort_import import effort_detector, import_effort, read_effort_checkpoint

PROJ = re.compile(r"^(encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj)\.(weight|bias)$")


def effort_state(*, module=False, principal=True, wrap=None, rank=1, seed=0) -> dict:
    """A tiny-CLIP detector in Effort's layout, residuals moved off their SVD values (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in load_backbone("tiny-clip").state_dict().items():
        match = PROJ.match(key)
        if not match:
            state[f"backbone.{key}"] = tensor.clone()
            continue
        name, kind = match.groups()
        if kind == "bias":
            state[f"backbone.{name}.bias"] = tensor.clone() + 0.1 * torch.randn(tensor.shape, generator=gen)
            continue
        U, S, Vh = torch.linalg.svd(tensor.double())
        r = S.numel() - rank
        state[f"backbone.{name}.weight_main"] = ((U[:, :r] * S[:r]) @ Vh[:r]).float()
        state[f"backbone.{name}.U_residual"] = (
            U[:, r:] + 0.3 * torch.randn(U[:, r:].shape, generator=gen)
        ).float()
        state[f"backbone.{name}.S_residual"] = (S[r:] * 5 + 1).float()
        state[f"backbone.{name}.V_residual"] = (
            Vh[r:] + 0.3 * torch.randn(Vh[r:].shape, generator=gen)
        ).float()
        if principal:
            state[f"backbone.{name}.U_r"] = U[:, :r].float()
            state[f"backbone.{name}.S_r"] = S[:r].float()
            state[f"backbone.{name}.V_r"] = Vh[:r].float()
    state["head.weight"] = torch.randn(2, 64, generator=gen)
    state["head.bias"] = torch.randn(2, generator=gen)
    if module:
        state = {f"module.{k}": v for k, v in state.items()}
    return {wrap: state, "epoch": torch.tensor(3)} if wrap else state


class EffortFormulaLinear(nn.Module):
    """Effort's projection: ``x (W_main + U_residual diag(S_residual) V_residual)ᵀ + b``."""

    def __init__(self, parts: dict):
        super().__init__()
        self.parts = parts

    def forward(self, x):
        p = self.parts
        weight = p["weight_main"] + p["U_residual"] @ torch.diag(p["S_residual"]) @ p["V_residual"]
        return F.linear(x, weight, p["bias"])


@torch.no_grad()
def reference_scores(state: dict, x: torch.Tensor) -> torch.Tensor:
    """P(fake) from Effort's formula: its layers, CLIP's pooler_output, the 2-way head, softmax."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CLIPVisionModel(CLIPVisionConfig(**BACKBONES["tiny-clip"].config)).eval()
    plain = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    model.load_state_dict({k: v for k, v in plain.items() if k in model.state_dict()}, strict=False)
    for name, _ in list(model.named_modules()):
        if re.search(r"self_attn\.(q|k|v|out)_proj$", name):
            parts = {
                p: plain[f"{name}.{p}"]
                for p in ("weight_main", "U_residual", "S_residual", "V_residual", "bias")
            }
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, EffortFormulaLinear(parts))
    logits = F.linear(model(pixel_values=x).pooler_output, state["head.weight"], state["head.bias"])
    return logits.softmax(-1)[:, 1]


def _x(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "module, principal, wrap",
    [(False, True, None), (True, False, "state_dict"), (True, True, "model"), (False, False, None)],
)
def test_imported_checkpoint_scores_equal_effort_formula(tmp_path, module, principal, wrap):
    state = effort_state(module=module, principal=principal, wrap=wrap)
    torch.save(state, tmp_path / "effort.pth")
    out, info = import_effort(tmp_path / "effort.pth", tmp_path / "masm", backbone="tiny-clip")
    x = _x()
    expected = reference_scores(state[wrap] if wrap else state, x)
    # The residuals were moved off their SVD values: a detector ignoring them would score differently.
    assert (expected - reference_scores(effort_state(seed=5), x)).abs().max() > 1e-3
    detector = load_checkpoint(out)
    assert (detector.score(x) - expected).abs().max().item() <= 1e-4
    assert info["imported_from"]["adapted_layers"] == 16
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == "merged" and config["model"]["method"]["name"] == "effort"
    pre = config["model"]["preprocessing"]
    assert pre["face_crop"] is not None and pre["input_size"] == 32  # Effort's: aligned face, CLIP mean/std
    assert tuple(pre["mean"]) == (0.48145466, 0.4578275, 0.40821073)
    assert ("U_r/S_r/V_r absent in 16 layers" in " ".join(info["imported_from"]["notes"])) == (not principal)


def test_unmerged_k1_detector_maps_factors_exactly(tmp_path):
    state = effort_state(rank=2)  # Effort with a rank-2 residual: K=1, m=2
    torch.save(state, tmp_path / "e.pth")
    detector = effort_detector(read_effort_checkpoint(tmp_path / "e.pth"), backbone="tiny-clip")
    assert detector.config.method.masm.subspace_rank == 2 and not detector.merged
    layer = detector.backbone.encoder.layers[0].self_attn.q_proj
    effort = {
        k.split(".")[-1]: v
        for k, v in state.items()
        if k.startswith("backbone.encoder.layers.0.self_attn.q_proj.")
    }
    assert torch.equal(layer.weight_sem, effort["weight_main"])
    assert torch.equal(layer.V, effort["V_residual"].T) and torch.equal(layer.s, effort["S_residual"])
    x = _x()
    assert (detector.score(x) - reference_scores(state, x)).abs().max().item() <= 1e-4
    # Trains as masm's Effort: the residual factors and the head only.
    assert detector.num_trainable() == 16 * 2 * (64 + 64 + 1) + 130


def test_cli_import_then_detect_and_train_from_it(tmp_path, capsys):
    state = effort_state(module=True)
    torch.save(state, tmp_path / "effort.pth")
    backbone_dir = tmp_path / "clip-arch"
    load_backbone("tiny-clip").save_pretrained(backbone_dir)  # --backbone as a directory with a config.json
    code = main(
        [
            "import",
            "effort",
            str(tmp_path / "effort.pth"),
            "--out",
            str(tmp_path / "det"),
            "--backbone",
            str(backbone_dir),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "imported 16 Effort layers" in printed and "stripped the DDP prefix" in printed

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "face.png")
    code = main(
        [
            "detect",
            str(tmp_path / "det"),
            str(tmp_path / "face.png"),
            "--no-face",
            "--out",
            str(tmp_path / "s.jsonl"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "s.jsonl").read_text())
    detector = load_checkpoint(tmp_path / "det")
    from masm.data.transforms import build_transform

    x = build_transform(detector.preprocessing, train=False)(image)[None]
    assert result["error"] is None
    assert abs(result["score"] - reference_scores(state, x).item()) <= 1e-4

    # As a training starting point: the imported backbone and head, a fresh Effort subspace on top.
    start = create_detector(str(tmp_path / "det"), "effort").eval()
    assert (start.score(x) - reference_scores(state, x)).abs().max().item() <= 1e-4
    assert start.preprocessing == detector.preprocessing


class NotATensor:
    pass


def _bad_files(tmp_path):
    good = effort_state()
    wrong_shape = dict(good)
    wrong_shape["backbone.encoder.layers.1.self_attn.v_proj.U_residual"] = torch.zeros(64, 3)
    no_main = {k: v for k, v in good.items() if not k.endswith("layers.2.self_attn.k_proj.weight_main")}
    plain_clip = {f"backbone.{k}": v for k, v in load_backbone("tiny-clip").state_dict().items()}
    files = {
        "text.pth": (b"hello, not a checkpoint\n", "not a PyTorch checkpoint"),
        "photo.jpg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), "not a PyTorch checkpoint"),
        "pickle.pth": ({"model": NotATensor()}, "needs arbitrary code .*NotATensor"),
        "shape.pth": (
            wrong_shape,
            r"'backbone.encoder.layers.1.self_attn.v_proj.U_residual' has shape \(64, 3\)",
        ),
        "nomain.pth": (no_main, r"missing key 'backbone.encoder.layers.2.self_attn.k_proj.weight_main'"),
        "clip.pth": (
            {**plain_clip, "head.weight": torch.zeros(2, 64), "head.bias": torch.zeros(2)},
            "not an Effort checkpoint",
        ),
        "other.pth": ({"weight": torch.zeros(3)}, "not an Effort checkpoint"),
    }
    for name, (content, _) in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            torch.save(content, tmp_path / name)
    return {name: message for name, (_, message) in files.items()}


def test_bad_files_give_one_clear_line_and_nonzero_exit(tmp_path, capsys):
    for name, message in _bad_files(tmp_path).items():
        code = main(
            [
                "import",
                "effort",
                str(tmp_path / name),
                "--out",
                str(tmp_path / "o"),
                "--backbone",
                "tiny-clip",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code != 0, name
        assert len(err.splitlines()) == 1 and name in err and re.search(message, err), (name, err)
    assert not (tmp_path / "o").exists()


def test_wrong_backbone_is_named(tmp_path):
    torch.save(effort_state(), tmp_path / "e.pth")
    with pytest.raises(MasmError, match="CLIP vision tower; --backbone tiny-dinov2 is a dinov2"):
        import_effort(tmp_path / "e.pth", tmp_path / "o", backbone="tiny-dinov2")
    with pytest.raises(MasmError, match=r"clip-vit-b16 needs .*768.*wrong --backbone"):
        import_effort(tmp_path / "e.pth", tmp_path / "o", backbone="clip-vit-b16")  # shapes only: no download

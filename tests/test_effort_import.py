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
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

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


# -- UniversalFakeDetect layout (Effort's AI-generated image detectors) -------------------------------------
UNIVFD_PROJ = re.compile(
    r"^vision_model\.(encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj)\.(weight|bias)$"
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    """A whole CLIPModel (text tower too) whose vision tower is the registry's tiny-clip architecture."""
    config = CLIPConfig(vision_config=BACKBONES["tiny-clip"].config, text_config=TINY_TEXT, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


def univfd_state(*, fc_width=64, position_ids=False, seed=0) -> dict:
    """Effort's UniversalFakeDetect ClipModel state dict: ``model.`` + a whole CLIPModel with the vision
    attention projections as Effort's SVD layers (residuals moved off their SVD values), ``fc`` one logit."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in tiny_clip_model(seed).state_dict().items():
        match = UNIVFD_PROJ.match(key)
        if not match:
            state[f"model.{key}"] = tensor.clone()
            continue
        name, kind = match.groups()
        prefix = f"model.vision_model.{name}"
        if kind == "bias":
            state[f"{prefix}.bias"] = tensor.clone() + 0.1 * torch.randn(tensor.shape, generator=gen)
            continue
        U, S, Vh = torch.linalg.svd(tensor.double())
        r = S.numel() - 1
        state[f"{prefix}.weight_main"] = ((U[:, :r] * S[:r]) @ Vh[:r]).float()
        state[f"{prefix}.U_residual"] = (U[:, r:] + 0.3 * torch.randn(U[:, r:].shape, generator=gen)).float()
        state[f"{prefix}.S_residual"] = (S[r:] * 5 + 1).float()
        state[f"{prefix}.V_residual"] = (Vh[r:] + 0.3 * torch.randn(Vh[r:].shape, generator=gen)).float()
    if position_ids:  # what transformers before 4.31 saved
        state["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        state["model.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["fc.weight"] = torch.randn(1, fc_width, generator=gen)
    state["fc.bias"] = torch.randn(1, generator=gen)
    return state


@torch.no_grad()
def univfd_reference_log_odds(state: dict, x: torch.Tensor) -> torch.Tensor:
    """``fc(feature)`` from Effort's formula on a whole CLIPModel: the pooled output, or CLIP's projection of
    it for an ``fc`` as wide as the projection."""
    clip = tiny_clip_model(seed=99)  # every weight comes from the state
    plain = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    result = clip.load_state_dict({k: v for k, v in plain.items() if k in clip.state_dict()}, strict=False)
    assert all(UNIVFD_PROJ.match(k) and k.endswith(".weight") for k in result.missing_keys)
    for name, _ in list(clip.vision_model.named_modules()):
        if re.search(r"self_attn\.(q|k|v|out)_proj$", name):
            parts = {
                p: plain[f"vision_model.{name}.{p}"]
                for p in ("weight_main", "U_residual", "S_residual", "V_residual", "bias")
            }
            parent, _, child = name.rpartition(".")
            setattr(clip.vision_model.get_submodule(parent), child, EffortFormulaLinear(parts))
    feature = clip.vision_model(pixel_values=x).pooler_output
    if state["fc.weight"].shape[1] != feature.shape[1]:
        feature = clip.visual_projection(feature)
    return F.linear(feature, state["fc.weight"], state["fc.bias"])[:, 0]


@pytest.mark.parametrize("fc_width, position_ids", [(64, False), (32, True)])
def test_univfd_layout_imports_one_logit_whole_image_detector(tmp_path, fc_width, position_ids):
    from masm.models.calibration import log_odds_of_logits

    state = univfd_state(fc_width=fc_width, position_ids=position_ids)
    torch.save({"model": state, "total_steps": 120}, tmp_path / "aigi.pth")  # as UnivFD's save_networks
    out, info = import_effort(tmp_path / "aigi.pth", tmp_path / "masm", backbone="tiny-clip")
    x = _x()
    expected = univfd_reference_log_odds(state, x)
    # The residuals were moved off their SVD values: a detector ignoring them would score differently.
    assert (
        expected - univfd_reference_log_odds(univfd_state(fc_width=fc_width, seed=5), x)
    ).abs().max() > 1e-3
    detector = load_checkpoint(out)
    assert detector.head_logits == 1 and tuple(detector.head.weight.shape) == (1, 64)
    assert (log_odds_of_logits(detector(x)) - expected).abs().max().item() <= 1e-4
    assert (detector.score(x) - torch.sigmoid(expected)).abs().max().item() <= 1e-4
    source = info["imported_from"]
    assert (source["layout"], source["head_logits"], source["adapted_layers"]) == ("univfd", 1, 16)
    text_tensors = sum(
        k.startswith("text_model.") or k in ("logit_scale", "text_projection.weight")
        for k in tiny_clip_model().state_dict()
    )
    assert f"dropped the text tower ({text_tensors + position_ids} tensors)" in source["notes"]
    assert any("folded" in note for note in source["notes"]) == (fc_width == 32)
    pre = json.loads((out / "config.json").read_text())["model"]["preprocessing"]
    assert pre["face_crop"] is None and pre["input_size"] == 32
    assert pre["whole_image"]["test"] == "center_crop" and pre["whole_image"]["small_side"] == 256
    # As a training starting point: its one-logit head carries over.
    start = create_detector(str(out), "effort").eval()
    assert start.head_logits == 1 and (start.score(x) - detector.score(x)).abs().max().item() <= 1e-5
    unmerged = effort_detector(read_effort_checkpoint(tmp_path / "aigi.pth"), backbone="tiny-clip")
    assert unmerged.num_trainable() == 16 * (64 + 64 + 1) + 65  # rank-1 factors and the one-logit head


def test_cli_imports_univfd_and_whole_image_deepfakebench(tmp_path, capsys):
    torch.save({"model": univfd_state()}, tmp_path / "aigi.pth")
    code = main(
        [
            "import",
            "effort",
            str(tmp_path / "aigi.pth"),
            "--out",
            str(tmp_path / "u"),
            "--backbone",
            "tiny-clip",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "one-logit (sigmoid) head" in printed and "(UniversalFakeDetect layout)" in printed
    assert "whole images, centre crop" in printed

    state = effort_state(module=True)
    torch.save(state, tmp_path / "face.pth")
    argv = ["import", "effort", str(tmp_path / "face.pth"), "--backbone", "tiny-clip", "--out"]
    assert main([*argv, str(tmp_path / "f"), "--whole-image"]) == 0
    printed = capsys.readouterr().out
    assert "two-logit (softmax) head" in printed and "(DeepfakeBench layout)" in printed
    detector = load_checkpoint(tmp_path / "f")
    assert detector.head_logits == 2 and detector.preprocessing.face_crop is None
    assert detector.preprocessing.whole_image is not None
    x = _x()
    assert (detector.score(x) - reference_scores(state, x)).abs().max().item() <= 1e-4
    assert main([*argv, str(tmp_path / "g")]) == 0  # without the flag: face crops, as before
    assert load_checkpoint(tmp_path / "g").preprocessing.face_crop is not None


def test_univfd_missing_extra_and_foreign_keys_are_named(tmp_path, capsys):
    good = univfd_state()
    q = "model.vision_model.encoder.layers.3.self_attn.q_proj"
    cases = {
        "missing.pth": (
            {k: v for k, v in good.items() if k != "model.vision_model.post_layernorm.weight"},
            r"missing key 'model\.vision_model\.post_layernorm\.weight'",
        ),
        "nofactor.pth": (
            {k: v for k, v in good.items() if k != f"{q}.V_residual"},
            rf"missing key '{re.escape(q)}\.V_residual'",
        ),
        "nobias.pth": ({k: v for k, v in good.items() if k != "fc.bias"}, r"missing key 'fc\.bias'"),
        "extra_tower.pth": (
            {**good, "model.vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(64, 64)},
            r"unexpected key 'model\.vision_model\.encoder\.layers\.0\.mlp\.fc3\.weight'",
        ),
        "extra_factor.pth": (
            {**good, f"{q}.W_extra": torch.zeros(3)},
            rf"unexpected key '{re.escape(q)}\.W_extra'",
        ),
        "extra_top.pth": (
            {**good, "model.extra_head.weight": torch.zeros(2)},
            r"unexpected key 'model\.extra_head\.weight'",
        ),
        "extra_fc.pth": ({**good, "fc.scale": torch.ones(1)}, r"unexpected key 'fc\.scale'"),
        "extra_head.pth": ({**effort_state(), "head.scale": torch.ones(1)}, r"unexpected key 'head\.scale'"),
        "width.pth": (
            {**good, "fc.weight": torch.zeros(1, 48)},
            r"key 'fc\.weight' has shape \(1, 48\), tiny-clip needs \(1, 64\)",
        ),
        "logits.pth": (
            {**good, "fc.weight": torch.zeros(3, 64), "fc.bias": torch.zeros(3)},
            "not a linear head of one or two logits",
        ),
        "third.pth": (
            {"encoder.blocks.0.weight": torch.zeros(2), "classifier.weight": torch.zeros(1, 2)},
            r"not an Effort checkpoint \(neither DeepfakeBench's layout.*first keys: encoder\.blocks\.0\.weight, "
            r"classifier\.weight\)",
        ),
    }
    for name, (state, message) in cases.items():
        torch.save({"model": state}, tmp_path / name)
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

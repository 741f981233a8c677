"""Backbone families behind one interface, tested over everything registered (issue 11).

Every family runs on a tiny random config built here (nothing is downloaded). A new registry entry or
family is tested the moment it exists.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from masm.errors import ConfigError, MasmError
from masm.method.apply import find_targets, masm_layers
from masm.models import (
    BACKBONES,
    create_detector,
    load_backbone,
    load_checkpoint,
    method_config,
    save_checkpoint,
)
from masm.models.detector import alignment_loss, uniformity_loss
from masm.models.factory import open_backbone
from masm.models.families import FAMILIES
from masm.models.fingerprint import backbone_fingerprint

TINY = [name for name in BACKBONES if name.startswith("tiny-")]


def _needs(name):
    family = FAMILIES[BACKBONES[name].family]
    if family.requires:
        pytest.importorskip(family.requires)
    return family


def _x(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_family_has_a_tiny_registry_entry():
    assert {BACKBONES[name].family for name in TINY} == set(FAMILIES)


@pytest.mark.parametrize("name", TINY)
def test_family_contract_init_merge_and_effort_count(name):
    family = _needs(name)
    loaded = open_backbone(name)
    x = _x(loaded.preprocessing.input_size)
    with torch.no_grad():
        pooled = family.pooled(loaded.model, x)
    detector = create_detector(name, "masm").eval()
    assert detector.family is family
    with torch.no_grad():
        # At step 0 the adapted backbone is the pretrained one: the family's pooled output.
        assert (detector.features(x) - pooled).abs().max().item() < 1e-5
        for p in detector.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        before = detector(x)
        detector.merge()
        assert not masm_layers(detector.backbone)
        assert (detector(x) - before).abs().max().item() < 1e-5
    # Default targets: the encoder's attention projections only, four per block.
    effort = create_detector(name, "effort")
    d = family.feature_dim(effort.backbone)
    names = [n for n, _ in masm_layers(effort.backbone)]
    blocks = len({re.search(r"(layers?|blocks)\.(\d+)\.", n).group(2) for n in names})
    assert len(names) == 4 * blocks and not any("head" in n for n in names)
    assert effort.num_trainable() == blocks * 4 * (2 * d + 1) + (2 * d + 2)


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_directory_picks_its_family(tmp_path, name):
    family = _needs(name)
    model = load_backbone(name)
    model.save_pretrained(tmp_path / "bb")
    detector = create_detector(str(tmp_path / "bb"), "linear").eval()
    assert detector.family is family and type(detector.backbone) is type(model)
    x = _x(detector.preprocessing.input_size)
    with torch.no_grad():
        assert torch.allclose(detector.features(x), family.pooled(model, x), atol=1e-6)


def test_unsupported_architecture_is_refused_naming_the_families(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(
        MasmError, match=r"model_type 'vit' is not a supported backbone.*clip.*siglip.*dinov2"
    ):
        create_detector(str(tmp_path / "vit"), "masm")


def test_incomplete_weights_are_an_error_not_a_random_backbone(tmp_path):
    load_backbone("tiny-dinov2").save_pretrained(tmp_path / "bb")
    weights = tmp_path / "bb" / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(k for k in tensors if "layer.1" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(MasmError, match="weights are incomplete.*missing"):
        load_backbone(str(tmp_path / "bb"))


def test_full_clip_and_siglip_directories_load_their_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    for cls, config in (
        (CLIPModel, CLIPConfig(vision_config=dict(small, image_size=16, patch_size=8), text_config=small)),
        (
            SiglipModel,
            SiglipConfig(vision_config=dict(small, image_size=16, patch_size=8), text_config=small),
        ),
    ):
        full = cls(config).eval()
        full.save_pretrained(tmp_path / cls.__name__)
        detector = create_detector(str(tmp_path / cls.__name__), "linear").eval()
        x = _x(16)
        with torch.no_grad():
            assert torch.allclose(
                detector.features(x), full.vision_model(pixel_values=x).pooler_output, atol=1e-6
            )


def test_timm_fused_qkv_is_split_per_projection_and_fused_back(tmp_path):
    pytest.importorskip("timm")
    detector = create_detector("tiny-timm-vit", "effort")
    names = {n for n, _ in masm_layers(detector.backbone)}
    assert "timm_model.blocks.0.attn.qkv.q_proj" in names and "timm_model.blocks.0.attn.proj" in names
    save_checkpoint(detector, tmp_path / "merged", merged=True)
    keys = set(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert "backbone.timm_model.blocks.0.attn.qkv.weight" in keys  # timm's own layout again
    x = _x(32)
    with torch.no_grad():
        assert (load_checkpoint(tmp_path / "merged")(x) - detector.eval()(x)).abs().max() < 1e-5


# -- compatibility across transformers versions ---------------------------------------------------------------
class _NestedLikeTransformers4(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model


def test_fingerprint_and_checkpoint_keys_do_not_depend_on_vision_model_nesting(tmp_path):
    model = load_backbone("tiny-clip")
    assert backbone_fingerprint(_NestedLikeTransformers4(model)) == backbone_fingerprint(model)
    detector = create_detector("tiny-clip", "effort")
    with torch.no_grad():
        for p in detector.trainable_parameters():
            p.add_(0.1)
    ckpt = save_checkpoint(detector, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    tensors = load_file(str(weights))
    assert not any("vision_model" in k for k in tensors)
    # As transformers 4 would have named them; the checksum is updated so that only the names differ.
    save_file(
        {k.replace("backbone.", "backbone.vision_model.", 1): v for k, v in tensors.items()}, str(weights)
    )
    config = json.loads((ckpt / "config.json").read_text())
    from masm.models.checkpoint import file_sha256

    config["sha256"]["model.safetensors"] = file_sha256(weights)
    (ckpt / "config.json").write_text(json.dumps(config))
    x = _x(32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(ckpt)(x), detector.eval()(x))


# -- ln-tune (GenD) -------------------------------------------------------------------------------------------
def test_ln_tune_trains_layernorms_and_head_on_the_unit_sphere(tmp_path):
    detector = create_detector("tiny-dinov2", "ln-tune")
    trainable = {n for n, p in detector.named_parameters() if p.requires_grad}
    norms = [m for m in detector.backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert detector.num_trainable() == sum(p.numel() for m in norms for p in m.parameters()) + 2 * 64 + 2
    assert all("norm" in n or n.startswith("head.") for n in trainable)
    x = _x(32, n=3)
    assert torch.allclose(detector.head_input(x).norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        for p in detector.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(detector, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "ckpt")(x), detector.eval()(x))


def test_alignment_and_uniformity_losses():
    same = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    assert alignment_loss(same, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(same, torch.tensor([0, 1, 0])).item() == pytest.approx(2.0, abs=1e-6)  # |e1-e2|^2
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity_loss(antipodal, t=2.0).item() == pytest.approx(-8.0, abs=1e-5)
    coincident = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    uniformity_loss(coincident).backward()
    assert torch.isfinite(coincident.grad).all()  # no NaN where two features coincide


def test_feature_losses_need_the_normalised_feature_and_reach_the_training_objective():
    with pytest.raises(ConfigError, match="set l2_normalize"):
        method_config("linear", {"features": {"lambda_align": 1.0}})
    config = method_config("ln-tune", {"features": {"lambda_align": 1.0, "lambda_uniform": 0.5}})
    from masm.method.losses import total_loss

    detector = create_detector("tiny-clip", config).train()
    labels = torch.tensor([0, 0, 1, 1])
    logits = detector(_x(32, n=4))
    assert set(detector.auxiliary_losses(labels)) == {"align", "uniform"}
    loss, logged = total_loss(logits, labels, detector, None)
    expected = logged["cls"] + 1.0 * logged["align"] + 0.5 * logged["uniform"]
    assert {"align", "uniform"} <= set(logged) and torch.allclose(loss.detach(), expected)


# -- masm bench speed --backbone ------------------------------------------------------------------------------
def test_speed_benchmark_baselines_follow_the_family_targets():
    # The whole `masm bench speed` run is tested on tiny-clip in test_bench_speed.py (it spawns processes);
    # here its family-specific baselines are built in process on the family least like CLIP.
    from masm.benchmarks.effort_reference import EffortReferenceLinear
    from masm.benchmarks.speed import SpeedSettings, _build

    settings = SpeedSettings(backbone="tiny-dinov3")
    reference, _ = _build("effort-reference", settings)
    effort, _ = _build("effort", settings)
    layers = [m for m in reference.backbone.modules() if isinstance(m, EffortReferenceLinear)]
    assert len(layers) == 16 and reference.num_trainable() == effort.num_trainable() == 16 * 129 + 130
    floor, _ = _build("frozen-floor", settings)
    targets = find_targets(floor.backbone, FAMILIES["dinov3"].attention_targets)
    assert sum(m.bias.numel() for _, m in targets if m.bias is not None) == 4 * 3 * 64  # k_proj has none
    assert floor.num_trainable() == 4 * 3 * 64 + 130

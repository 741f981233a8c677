"""The demo backbone's pretraining: loadable output, determinism, reuse, and a loss that goes down."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from masm.demo import pretrain
from masm.models import load_backbone

SHORT = dict(steps=12, batch_size=8, seed=0, progress=False, evaluate=False)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return pretrain.pretrain_demo_backbone(tmp_path_factory.mktemp("first") / "demo-clip", **SHORT)


def test_short_run_writes_a_loadable_backbone(short_run, monkeypatch):
    assert (short_run / "model.safetensors").is_file()
    recipe = json.loads((short_run / "recipe.json").read_text())
    assert (
        recipe["steps"] == SHORT["steps"] and recipe["seed"] == 0 and recipe["objective"]["name"] == "simmim"
    )
    assert np.isfinite(recipe["final_loss"]) and len(recipe["losses"]) == SHORT["steps"]
    assert not [p for p in short_run.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    direct = CLIPVisionModel.from_pretrained(short_run).eval()
    monkeypatch.setenv("MASM_CACHE_DIR", str(short_run.parent))
    registered = load_backbone("demo-clip")
    assert registered.config.hidden_size == pretrain.DEMO_BACKBONE_CONFIG.hidden_size
    x = pretrain.to_model_input(pretrain.real_photo_crops(2, 64, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(
            registered(pixel_values=x).pooler_output, direct(pixel_values=x).pooler_output
        )


def test_same_seed_gives_identical_weights(short_run, tmp_path):
    again = pretrain.pretrain_demo_backbone(tmp_path / "demo-clip", **SHORT)
    first, second = load_file(short_run / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    # and training moved the weights away from the seeded random initialisation
    trained = CLIPVisionModel.from_pretrained(short_run).state_dict()
    random_init = pretrain._new_backbone(0).state_dict()
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[name], random_init[name])


def test_existing_backbone_is_reused_unless_forced(short_run, monkeypatch):
    weights = (short_run / "model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a complete backbone exists")

    monkeypatch.setattr(pretrain, "_train", no_training)
    assert pretrain.pretrain_demo_backbone(short_run, **SHORT) == short_run
    monkeypatch.setenv("MASM_CACHE_DIR", str(short_run.parent))
    assert pretrain.pretrain_demo_backbone(steps=1, batch_size=2, progress=False) == short_run  # default dir
    assert (short_run / "model.safetensors").read_bytes() == weights
    with pytest.raises(AssertionError, match="retrained"):
        pretrain.pretrain_demo_backbone(short_run, **SHORT, force=True)
    assert (short_run / "model.safetensors").read_bytes() == weights  # a failed rebuild keeps the old one


def test_incomplete_directory_is_rebuilt(tmp_path):
    out = tmp_path / "demo-clip"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what an interrupted non-atomic save could leave
    assert not pretrain.is_complete_backbone(out)
    pretrain.pretrain_demo_backbone(out, steps=1, batch_size=2, progress=False, evaluate=False)
    assert pretrain.is_complete_backbone(out)
    CLIPVisionModel.from_pretrained(out)


def test_loss_decreases_over_the_short_run(short_run):
    losses = json.loads((short_run / "recipe.json").read_text())["losses"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_real_photo_crops_are_seeded_uint8_crops(tmp_path):
    crops = pretrain.real_photo_crops(6, 32, seed=3)
    assert crops.shape == (6, 32, 32, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops, pretrain.real_photo_crops(6, 32, seed=3))
    assert not np.array_equal(crops, pretrain.real_photo_crops(6, 32, seed=4))

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "notes.txt").write_text("not an image")
    assert pretrain.real_photo_crops(3, 16, seed=0, real_dir=tmp_path).shape == (3, 16, 16, 3)


def test_masked_patches_are_exactly_the_mask_ratio_and_targets_follow_token_order():
    mask = pretrain.random_patch_mask(5, 64, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64) and (mask.sum(1) == round(pretrain.MASK_RATIO * 64)).all()
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    patches = pretrain.patchify(images, 8)
    assert patches.shape == (2, 4, 3 * 64)
    # token 1 is the top-right 8x8 patch (row-major, like the ViT's patch embedding)
    assert torch.equal(patches[0, 1].view(3, 8, 8), images[0, :, :8, 8:])


def test_reconstruction_loss_sees_the_visible_patches_too():
    """The encoder must keep what context cannot predict: a change to a visible patch changes the loss."""
    model = pretrain._new_backbone(0)
    decoder = pretrain.PixelDecoder(model.config)
    images = torch.from_numpy(pretrain.real_photo_crops(2, 64, seed=0)).permute(0, 3, 1, 2).float() / 255
    loss = pretrain.masked_reconstruction_loss(model, decoder, images, torch.Generator().manual_seed(1))
    mask = pretrain.random_patch_mask(2, 64, torch.Generator().manual_seed(1))
    visible = int((~mask[0]).nonzero()[0])
    noisy = images.clone()
    row, col = divmod(visible, 8)
    noisy[0, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 0.2 * torch.randn(3, 8, 8)
    again = pretrain.masked_reconstruction_loss(model, decoder, noisy, torch.Generator().manual_seed(1))
    assert not torch.isclose(loss, again)


def test_augmented_views_keep_shape_and_range():
    images = torch.from_numpy(pretrain.real_photo_crops(4, 96, seed=0)).permute(0, 3, 1, 2).float() / 255
    views = pretrain.augment_views(images, 64, torch.Generator().manual_seed(0))
    assert views.shape == (4, 3, 64, 64) and 0 <= views.min() and views.max() <= 1

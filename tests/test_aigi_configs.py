"""The AI-generated-image protocols' configs (GenImage, UniversalFakeDetect): every method, whole images,
the protocols' data, and no selection on test generators."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from masm.benchmarks.quality import METHODS
from masm.training.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("protocol", ["genimage", "univfd"])
def test_protocol_files_cover_every_method_with_whole_image_inputs(protocol):
    names = {p.stem for p in (CONFIGS / protocol).glob("*.yaml")} - {"base"}
    assert names == set(METHODS)
    for name in names:
        config = load_train_config(CONFIGS / protocol / f"{name}.yaml")
        assert config.model.method.name == name and config.model.backbone == "clip-vit-l14"
        pre = config.model.preprocessing
        assert pre.face_crop is None and pre.input_size == 224
        assert (pre.whole_image.train, pre.whole_image.test) == ("random_crop", "center_crop")
        assert config.data.train.startswith(f"{protocol}:") and config.data.test
        assert "base" in yaml.safe_load((CONFIGS / protocol / f"{name}.yaml").read_text())


def test_genimage_trains_on_sd14_and_never_selects_on_its_test_split():
    config = load_train_config(CONFIGS / "genimage" / "masm.yaml")
    assert config.data.train == "genimage:data/GenImage/stable_diffusion_v_1_4@train"
    assert config.data.test == ["genimage:data/GenImage@val"]
    assert config.data.val == "none" and config.eval_every == 0  # GenImage's val split is its test split


def test_univfd_trains_on_progan_and_selects_on_its_validation_set():
    config = load_train_config(CONFIGS / "univfd" / "masm.yaml")
    assert config.data.train == "univfd:data/CNNDetection/train"
    assert config.data.val == "univfd:data/CNNDetection/val" and config.select_on == "val"

"""Checkpoint format: round trips, merged export, and clear errors on bad files (issue 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from masm.errors import CheckpointError
from masm.models import create_detector, load_checkpoint, save_checkpoint
from masm.models.checkpoint import file_sha256


def _trained(method="masm"):
    detector = create_detector("tiny-clip", method)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in detector.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return detector.eval()


@pytest.mark.parametrize("method", ["masm", "effort", "lora", "full", "linear"])
@pytest.mark.parametrize("merged", [False, True])
def test_round_trip_gives_identical_outputs(tmp_path, method, merged):
    detector = _trained(method)
    save_checkpoint(detector, tmp_path / "ckpt", merged=merged)
    loaded = load_checkpoint(tmp_path / "ckpt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (detector(x) - loaded(x)).abs().max().item() <= (1e-5 if merged else 0.0)
    assert loaded.preprocessing == detector.preprocessing
    assert loaded.merged == merged


def test_adapter_checkpoint_holds_only_trainable_tensors_and_head(tmp_path):
    save_checkpoint(_trained("effort"), tmp_path / "ckpt")
    keys = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert {"head.weight", "head.bias"} <= keys
    assert all(k.startswith("head.") or k.rsplit(".", 1)[-1] in ("U", "s", "V") for k in keys)


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def test_tampered_or_truncated_weights_are_refused_with_the_file_named(tmp_path):
    ckpt = save_checkpoint(_trained(), tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    original = weights.read_bytes()
    _corrupt(weights, lambda d: d[:-1] + bytes([d[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="model.safetensors.*modified or truncated"):
        load_checkpoint(ckpt)
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)


def _rewrite(ckpt, tensors):
    save_file(tensors, str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config["sha256"]["model.safetensors"] = file_sha256(ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps(config))


def test_wrong_shape_missing_and_unknown_keys_are_named(tmp_path):
    ckpt = save_checkpoint(_trained(), tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    _rewrite(ckpt, {**tensors, "head.weight": torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match="'head.weight' has shape"):
        load_checkpoint(ckpt)
    _rewrite(ckpt, {k: v for k, v in tensors.items() if k != "head.bias"})
    with pytest.raises(CheckpointError, match="missing key 'head.bias'"):
        load_checkpoint(ckpt)
    _rewrite(ckpt, {**tensors, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_checkpoint(ckpt)


def test_bad_config_and_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    ckpt = save_checkpoint(_trained(), tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(ckpt)


def test_checkpoint_on_other_backbone_weights_is_refused(tmp_path):
    ckpt = save_checkpoint(_trained(), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["backbone_fingerprint"] = "0" * 32
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(ckpt)


def test_overwrite_is_atomic_and_extra_files_round_trip(tmp_path):
    from masm.models.checkpoint import load_extra_tensors

    detector = _trained()
    save_checkpoint(detector, tmp_path / "ckpt")
    save_checkpoint(detector, tmp_path / "ckpt", extra_tensors={"state": {"a": torch.arange(3)}})
    assert torch.equal(load_extra_tensors(tmp_path / "ckpt", "state")["a"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _copy_of(path, name):
    import shutil

    target = path.with_name(name)
    shutil.copytree(path, target)
    return target


@pytest.mark.parametrize(
    "left_behind, reader_sees, recovered",
    [
        # killed between the two renames: the old copy and the complete new one, no DIR
        ({"ckpt.old": "old", "ckpt.tmp": "new"}, "new", "new"),
        # killed after the first rename, before the new copy was complete
        ({"ckpt.old": "old", "ckpt.tmp": "partial"}, "old", "old"),
        # killed while writing the new copy: DIR is intact
        ({"ckpt": "old", "ckpt.tmp": "partial"}, "old", "old"),
        # the new copy complete, not yet switched in: readers keep the switched-in one, a resume the newest
        ({"ckpt": "old", "ckpt.tmp": "new"}, "old", "new"),
        # killed after the switch, before the old copy was removed
        ({"ckpt": "new", "ckpt.old": "old"}, "new", "new"),
    ],
)
def test_recovery_takes_the_newest_complete_copy_a_kill_left(tmp_path, left_behind, reader_sees, recovered):
    from masm.models.checkpoint import checkpoint_candidates, recover_checkpoint

    models = {"old": _trained("effort"), "new": _trained("effort")}
    with torch.no_grad():
        models["new"].head.weight.add_(1.0)
    for name, model in [("old", models["old"]), ("new", models["new"]), ("partial", models["new"])]:
        save_checkpoint(model, tmp_path / f"src-{name}")
    weights = tmp_path / "src-partial" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a data file cut short
    for name, which in left_behind.items():
        _copy_of(tmp_path / f"src-{which}", name)
    directory = tmp_path / "ckpt"
    # a reader finds a complete copy without moving anything
    assert load_checkpoint(directory).head.weight.equal(models[reader_sees].head.weight)
    recover_checkpoint(directory)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")] == ["ckpt"]
    assert checkpoint_candidates(directory) == [directory]
    assert load_checkpoint(directory).head.weight.equal(models[recovered].head.weight)

"""One-logit heads (issue 30): P(fake) = sigmoid(logit), trained with binary cross-entropy, end to end.

Two-logit heads keep their numbers bit for bit (softmax in float32, cross-entropy); checkpoints written
before the choice existed load as two-logit detectors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from masm.config import from_dict
from masm.data.index import FrameRecord
from masm.data.transforms import build_transform
from masm.errors import ConfigError, MasmError, SettingsError
from masm.evaluation.scoring import score_records
from masm.explain import explain_batches
from masm.method.losses import classification_loss, total_loss
from masm.models import ModelConfig, create_detector, load_checkpoint, save_checkpoint
from masm.training import load_train_config, train
from test_train_support import TINY_CONFIG, make_folder_dataset, tiny_overrides


def _x(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _moved(detector, seed=3):
    """Trainable tensors and head moved off their start, so that scores are not all near 0.5."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in detector.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return detector.eval()


def test_one_logit_detector_trains_saves_loads_and_scores_sigmoid(tmp_path):
    data = make_folder_dataset(tmp_path / "fx")
    overrides = tiny_overrides(data, epochs=1, **{"model.head_logits": 1, "data.test": f"[folder:{data}]"})
    result = train(load_train_config(TINY_CONFIG, overrides), tmp_path / "run", progress=False)
    assert result.global_step == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["cls"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))

    detector = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert detector.head_logits == 1 and detector.head.weight.shape == (1, 64)
    assert detector.config.head_logits == 1
    x = _x()
    logits = detector(x)
    assert logits.shape == (5, 1)
    assert torch.equal(detector.score(x), torch.sigmoid(logits.float()[:, 0]))
    # the head trained: it is no longer the seeded fresh head of the same config
    fresh = create_detector("tiny-clip", detector.config.method, head_logits=1, seed=0)
    assert not torch.equal(fresh.head.weight, detector.head.weight)
    # the run's test evaluation scored with the sigmoid (a softmax over one logit would give all 1.0)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["datasets"]["fx"]["frame"]["auc"] is not None
    merged = load_checkpoint(tmp_path / "run" / "checkpoints" / "last", merge=True)
    assert (merged.score(x) - detector.score(x)).abs().max().item() <= 1e-5


def test_classification_loss_is_bce_for_one_logit_and_cross_entropy_for_two():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0, 1])
    one = torch.randn(5, 1, generator=gen) * 3
    expected = log_loss(labels.numpy(), torch.sigmoid(one[:, 0]).double().numpy(), labels=[0, 1])
    assert classification_loss(one, labels).item() == pytest.approx(expected, rel=1e-5)
    two = torch.randn(5, 2, generator=gen)
    assert torch.equal(classification_loss(two, labels), F.cross_entropy(two, labels))
    probs = two.softmax(-1)[:, 1].double().numpy()
    assert classification_loss(two, labels).item() == pytest.approx(log_loss(labels.numpy(), probs), rel=1e-5)
    loss, logged = total_loss(one, labels, torch.nn.Linear(1, 1), None)
    assert logged["cls"].item() == pytest.approx(expected, rel=1e-5) and loss.item() == logged["total"].item()


def test_head_logits_setting_is_checked():
    with pytest.raises(SettingsError, match=r"^'model.head_logits': a head has 1 logit \(sigmoid\) or 2"):
        from_dict(ModelConfig, {"head_logits": 3}, "model")
    with pytest.raises(ConfigError, match="model.head_logits: expected an integer, got 'one'"):
        from_dict(ModelConfig, {"head_logits": "one"}, "model")
    assert from_dict(ModelConfig, {}, "model").head_logits is None
    assert create_detector("tiny-clip", "linear").head_logits == 2  # the default is unchanged


def test_scoring_and_explanations_use_the_sigmoid_of_one_logit(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(FrameRecord(str(tmp_path / f"{i}.png"), i % 2, f"v{i}"))
    for logits_count in (1, 2):
        detector = _moved(create_detector("tiny-clip", "masm", head_logits=logits_count))
        transform = build_transform(detector.preprocessing, train=False)
        x = torch.stack([transform(np.asarray(Image.open(r.path).convert("RGB"))) for r in records])
        logits = detector(x).detach().float()
        log_odds = np.full(3, np.nan)
        scores, failed = score_records(detector, records, transform, log_odds=log_odds)
        assert not failed
        if logits_count == 1:
            expected, z = torch.sigmoid(logits[:, 0]), logits[:, 0]
        else:  # exactly what masm computed before one-logit heads existed
            expected, z = logits.softmax(-1)[:, 1], logits[:, 1] - logits[:, 0]
        assert np.array_equal(scores, expected.double().numpy())
        assert np.allclose(log_odds, z.double().numpy(), rtol=0, atol=1e-6)
        assert scores.max() < 1.0 and len(set(scores)) == 3  # a softmax over one logit would be all 1.0
        for method in ("relevance", "grad-cam"):
            explained = explain_batches(detector, x, method=method)
            assert torch.allclose(explained.scores, expected, atol=1e-6), method
            assert torch.allclose(explained.log_odds, z, atol=1e-5), method


def test_checkpoint_without_the_field_loads_as_two_logits_and_heads_carry_over(tmp_path):
    detector = _moved(create_detector("tiny-clip", "effort"))
    save_checkpoint(detector, tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["model"].pop("head_logits") == 2
    config_path.write_text(json.dumps(config))  # as written before the field existed
    old = load_checkpoint(tmp_path / "old")
    assert old.head_logits == 2 and torch.equal(old.score(_x()), detector.score(_x()))

    one = _moved(create_detector("tiny-clip", "effort", head_logits=1))
    save_checkpoint(one, tmp_path / "one", merged=True)
    start = create_detector(str(tmp_path / "one"), "effort")  # a one-logit checkpoint as the starting point
    assert start.head_logits == 1 and torch.allclose(start.eval().score(_x()), one.score(_x()), atol=1e-5)
    with pytest.raises(MasmError, match=r"model.head_logits is 2, but the checkpoint .* 1-logit head"):
        create_detector(str(tmp_path / "one"), "effort", head_logits=2)


def test_resume_compares_head_logits_only_when_set(tmp_path):
    from masm.training.run_folder import config_differences

    data = tmp_path / "fx"
    saved = load_train_config(TINY_CONFIG, tiny_overrides(data, **{"model.head_logits": 1}))
    assert config_differences(saved, load_train_config(TINY_CONFIG, tiny_overrides(data))) == []
    wanted = load_train_config(TINY_CONFIG, tiny_overrides(data, **{"model.head_logits": 2}))
    assert config_differences(saved, wanted) == [("model.head_logits", 1, 2)]

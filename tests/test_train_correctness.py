"""Trainer correctness on any device: the epoch's last accumulation group, non-finite gradients, resuming
with missing weights, the SVD memory cache's bound, persistent loader workers, the optimizer's kernels."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from masm.errors import CheckpointError, MasmError
from masm.method import decomposition
from masm.training import checkpoints as checkpoints_module
from masm.training import load_train_config, train
from masm.training import loop as loop_module
from masm.training import optim as optim_module
from masm.training.health import StepHealth
from test_train_support import TINY_CONFIG, make_folder_dataset, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "fx")  # 12 frames


def _config(data, **extra):
    return load_train_config(TINY_CONFIG, tiny_overrides(data, **{"data.val": "none", **extra}))


def _grads_at_each_step(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the gradients every optimizer step is about to use."""
    steps: list[dict[str, torch.Tensor]] = []
    decide = StepHealth.decide

    def recording(self, run):
        steps.append({n: p.grad.clone() for n, p in run.detector.named_parameters() if p.grad is not None})
        return decide(self, run)

    monkeypatch.setattr(StepHealth, "decide", recording)
    return steps


def test_last_accumulation_group_averages_over_its_own_micro_batches(tmp_path, data, monkeypatch):
    # 12 frames: batch 8 gives steps of 8 and 4 frames; batch 2 x 4 micro-batches gives groups of 4 and 2
    # micro-batches over the same frames. A near-zero lr keeps both runs at the same weights, so the
    # gradients of step 2 must agree: the short group is a mean over its 2 micro-batches, not over 4.
    common = {"epochs": 1, "optim.lr": "1.0e-12"}
    whole = _grads_at_each_step(monkeypatch)
    train(_config(data, **common, **{"data.batch_size": 8}), tmp_path / "whole", progress=False)
    monkeypatch.undo()
    accumulated = _grads_at_each_step(monkeypatch)
    config = _config(data, **common, **{"data.batch_size": 2, "optim.grad_accum_steps": 4})
    train(config, tmp_path / "accum", progress=False)
    assert len(whole) == len(accumulated) == 2
    for step in (0, 1):
        assert whole[step].keys() == accumulated[step].keys()
        for name, grad in whole[step].items():
            torch.testing.assert_close(
                accumulated[step][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
            )


class _InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss, but sends an infinite gradient to ``weight``."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_non_finite_gradient_with_finite_loss_refuses_the_step(tmp_path, data, monkeypatch):
    real_loss = loop_module.total_loss
    calls = {"n": 0}

    def poisoned(logits, labels, detector, *args, **kwargs):
        calls["n"] += 1
        loss, terms = real_loss(logits, labels, detector, *args, **kwargs)
        if calls["n"] == 3:
            loss = loss + _InfiniteGradient.apply(detector.head.weight)
        return loss, terms

    runs, snapshots = [], []
    optimizer_step = loop_module._optimizer_step

    def snapshot_then_step(run):  # the state every step starts from
        runs.append(run)
        snapshots.append(_state(run))
        return optimizer_step(run)

    monkeypatch.setattr(loop_module, "total_loss", poisoned)
    monkeypatch.setattr(loop_module, "_optimizer_step", snapshot_then_step)
    with pytest.raises(
        MasmError, match=r"gradient is not finite at step 3 .*loss is finite: parameter 'head.weight'"
    ):
        train(_config(data), tmp_path / "run", progress=False)
    # the refused step changed neither the weights, nor Adam's moments, nor the mask's running averages,
    # and nor did any step after it (decided on the device: the host noticed at the next check point)
    before, after = snapshots[2], _state(runs[-1])
    assert before.keys() == after.keys() and len(snapshots) >= 3
    for key in before.keys() - {"mask/num_steps"}:  # the host's count of steps it asked for
        assert torch.equal(before[key], after[key]), key


def _state(run) -> dict[str, torch.Tensor]:
    state = {f"param/{n}": p.detach().clone() for n, p in run.detector.named_parameters() if p.requires_grad}
    for i, slot in enumerate(run.optimizer.state.values()):
        state.update({f"adam/{i}/{k}": v.clone() for k, v in slot.items() if torch.is_tensor(v)})
    if run.controller is not None:
        state.update({f"mask/{k}": v.clone() for k, v in run.controller.state_dict().items()})
    return state


def test_resume_refuses_a_checkpoint_without_a_trainable_weight(tmp_path, data, monkeypatch):
    config = _config(data, max_steps=1)
    train(config, tmp_path / "run", progress=False)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    dropped = sorted(k for k in saved if not k.startswith("head."))[0]
    real_load = checkpoints_module.load_extra_tensors

    def without_one(directory, stem):
        tensors = real_load(directory, stem)
        return {k: v for k, v in tensors.items() if k != dropped} if stem == "model" else tensors

    monkeypatch.setattr(checkpoints_module, "load_extra_tensors", without_one)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: trainable weight '{dropped}' is missing"):
        train(_config(data, max_steps=2), tmp_path / "run", resume=True, progress=False)


def test_persistent_workers_see_every_epoch(tmp_path):
    # augmentation is seeded by (epoch, index): workers kept across epochs must see the epoch change
    data = make_folder_dataset(tmp_path / "fx", n_real=2, n_fake=2)  # one step per epoch
    extra = {"epochs": 2, "data.augment.enabled": "true"}
    in_process = train(_config(data, **extra, **{"data.num_workers": 0}), tmp_path / "w0", progress=False)
    workers = train(_config(data, **extra, **{"data.num_workers": 1}), tmp_path / "w1", progress=False)
    a = load_file(str(in_process.last_checkpoint / "model.safetensors"))
    b = load_file(str(workers.last_checkpoint / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_svd_memory_cache_keeps_the_most_recent_entries_within_its_bound(monkeypatch):
    entry = (2 * 16 * 16 + 16) * 8  # U, S, Vh of a 16x16 weight in float64
    monkeypatch.setattr(decomposition, "_MEMORY_LIMIT", 48 * entry)
    monkeypatch.setattr(decomposition, "_memory", OrderedDict())
    weights = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(60)]
    keys = [decomposition.weight_key(w, "float64") for w in weights]
    for w in weights[:40]:
        decomposition.decompose(w, cache_dir=False)
    decomposition.decompose(weights[0], cache_dir=False)  # used again: now the most recent
    for w in weights[40:]:
        decomposition.decompose(w, cache_dir=False)
    held = decomposition._memory
    assert sum(decomposition._nbytes(f) for f in held.values()) <= decomposition._MEMORY_LIMIT
    assert keys[0] in held and keys[-1] in held and keys[1] not in held
    assert list(held)[-1] == keys[-1]


def test_adam_is_fused_and_skips_a_refused_step_on_the_device():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = optim_module.make_optimizer(params, "adam", lr=1e-3)
    assert optimizer.defaults["fused"] is True
    params[0].grad = torch.ones(3)
    optimizer.step()
    before = (params[0].detach().clone(), optimizer.state[params[0]]["exp_avg"].clone())
    optimizer.found_inf = torch.ones(())  # what the trainer sets for a refused step
    params[0].grad = torch.full((3,), float("nan"))
    optimizer.step()
    assert torch.equal(params[0], before[0]) and torch.equal(optimizer.state[params[0]]["exp_avg"], before[1])
    assert int(optimizer.state[params[0]]["step"]) == 1


def test_training_takes_autocast_from_the_neutral_module():
    from masm import precision

    assert loop_module.autocast_for is precision.autocast_for
    assert "evaluation" not in loop_module.autocast_for.__module__
    with precision.autocast_for(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast_for(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_optimizer_state_of_runs_before_layer_groups_is_regrouped():
    """Runs saved before same-shape layers shared one tensor per factor had three optimizer entries per MASM
    layer; they resume with each group's moments stacked from its layers' and its step the largest."""
    from masm.method import masm_layers
    from masm.models import create_detector

    detector = create_detector("tiny-clip", "masm")
    optimizer = optim_module.make_optimizer(detector.trainable_parameters(), "adam", lr=1e-3)
    layers = [layer for _, layer in masm_layers(detector)]
    old, index = {}, 0
    for layer in layers:  # the old order: each layer's U, s, V in model order, then the head
        for name in ("U", "s", "V"):
            shape = getattr(layer, name).shape
            old[index] = {"step": torch.tensor(float(index)), "exp_avg": torch.full(shape, float(index))}
            old[index]["exp_avg_sq"] = old[index]["exp_avg"].abs()
            index += 1
    head = detector.head.weight
    old[index] = {
        "step": torch.tensor(1.0),
        "exp_avg": torch.ones_like(head),
        "exp_avg_sq": torch.ones_like(head),
    }
    saved = {"state": old, "param_groups": [{**optimizer.param_groups[0], "params": list(range(index + 2))}]}
    saved["param_groups"][0].update(fused=None, foreach=True)
    optimizer.load_state_dict(checkpoints_module.regroup_optimizer_state(saved, detector, optimizer))
    (group,) = detector.backbone.masm_groups.groups
    state = optimizer.state[group.V]
    for i, layer in enumerate(layers):
        assert torch.equal(state["exp_avg"][layer.index], torch.full_like(layer.V, float(3 * i + 2)))
    assert float(state["step"]) == 3 * (len(layers) - 1) + 2  # the largest of the layers' counts
    assert torch.equal(optimizer.state[head]["exp_avg"], torch.ones_like(head))

"""Selective layer mask: learning state, selection rules, masking semantics, persistence (issue 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from masm import MaskConfig, MASMConfig, SelectiveMaskController, apply_masm
from masm.errors import ConfigError
from masm.method import subspace_update
from masm.models import load_backbone


def _model(K=2, m=2):
    return apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=K, subspace_rank=m))


def _set_grads(controller, fn):
    """Give every subspace's factors the gradient fn(layer_index, k, shape of the factor's columns)."""
    for group in controller.groups:
        for p in (group.U, group.s, group.V):
            p.grad = torch.zeros_like(p)
    for i, (_, layer) in enumerate(controller.layers):
        for k in range(controller.num_subspaces):
            cols = layer.subspace_columns(k)
            for name in ("U", "s", "V"):
                row = layer.grad(name)  # the layer's row of its group's gradient
                row[..., cols] = fn(i, k, row[..., cols].shape)


def test_learning_state_matches_the_formula_on_synthetic_gradients():
    controller = SelectiveMaskController(_model(), MaskConfig(beta=0.9))
    rng = np.random.default_rng(0)
    # Layer i, subspace k: gradient = bias_ik + noise of std sigma_ik (known bias and variance).
    bias = rng.uniform(0, 1, (16, 2))
    sigma = rng.uniform(0.1, 2, (16, 2))
    history = {}
    for _ in range(30):
        draws = {}

        def grad(i, k, shape, draws=draws):
            g = torch.full(shape, bias[i, k]) + sigma[i, k] * torch.randn(shape)
            draws.setdefault((i, k), []).append(g.reshape(-1))
            return g

        _set_grads(controller, grad)
        controller.observe()
        for key, parts in draws.items():
            history.setdefault(key, []).append(torch.cat(parts).double().numpy())
    rho = controller.learning_state()
    beta, t = 0.9, 30
    for (i, k), gs in history.items():
        mu = np.zeros_like(gs[0])
        nu = np.zeros_like(gs[0])
        for g in gs:
            mu = beta * mu + (1 - beta) * g
            nu = beta * nu + (1 - beta) * g * g
        mu, nu = mu / (1 - beta**t), nu / (1 - beta**t)
        b, var = (mu**2).sum(), np.clip(nu - mu**2, 0, None).sum()
        assert rho[i, k].item() == pytest.approx(b / (b + var), rel=1e-4)
    # Consistent gradients (high bias/noise ratio) give a higher state than noisy ones.
    snr = bias / sigma
    hi, lo = np.unravel_index(snr.argmax(), snr.shape), np.unravel_index(snr.argmin(), snr.shape)
    assert rho[hi].item() > rho[lo].item()


def test_constant_gradients_have_state_one_and_zero_mean_noise_has_state_near_zero():
    controller = SelectiveMaskController(_model(), MaskConfig(beta=0.5))
    for _ in range(5):
        _set_grads(controller, lambda i, k, s: torch.ones(s))
        controller.observe()
    assert torch.allclose(controller.learning_state(), torch.ones(16, 2), atol=1e-6)
    controller = SelectiveMaskController(_model(), MaskConfig(beta=0.99))
    sign = 1.0
    for _ in range(200):
        _set_grads(controller, lambda i, k, s, sign=sign: torch.full(s, sign))
        controller.observe()
        sign = -sign
    assert controller.learning_state().max().item() < 0.02


def test_layer_selection_and_subspace_balance_follow_the_rules_exactly():
    controller = SelectiveMaskController(_model(K=4, m=1), MaskConfig(top_fraction=0.75, delta=0.5))
    rho = torch.full((16, 4), 0.1)
    rho[:4] = 0.0  # the 4 weakest layers: outside the top 75% (12 of 16 are kept)
    rho[4] = torch.tensor([0.9, 0.1, 0.1, 0.1])  # share 0.75 > 1.5/4 = 0.375: subspace 0 paused
    rho[5] = torch.tensor([0.3, 0.2, 0.2, 0.2])  # largest share 0.333 <= 0.375: nothing paused
    mask = controller.compute_mask(rho)
    assert not mask[:4].any()
    assert mask[4].tolist() == [False, True, True, True]
    assert mask[5].all() and mask[6:].all()
    only_balance = SelectiveMaskController(_model(K=4, m=1), MaskConfig(layer_selection=False, delta=0.5))
    assert only_balance.compute_mask(rho)[:4].all()  # ρ = 0: no share, nothing paused
    only_select = SelectiveMaskController(_model(K=4, m=1), MaskConfig(subspace_balance=False))
    assert only_select.compute_mask(rho)[4].all()


def test_at_least_one_subspace_stays_active_in_a_selected_layer():
    controller = SelectiveMaskController(_model(K=2, m=1), MaskConfig(layer_selection=False, delta=-0.9))
    mask = controller.compute_mask(torch.tensor([[0.6, 0.4]] * 16))
    assert mask.sum(1).tolist() == [1] * 16 and mask[:, 1].all()


def _adam(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_mask_is_recomputed_after_warmup_at_each_interval(tmp_path):
    log = tmp_path / "masks.jsonl"
    model = _model()
    optimizer = _adam(model)
    controller = SelectiveMaskController(model, MaskConfig(warmup=3, interval=2), log_path=log)
    for _ in range(8):
        _set_grads(controller, lambda i, k, s: torch.randn(s) + (i % 3))
        controller.step(optimizer)
        optimizer.step()
        controller.restore()
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [3, 5, 7]
    record = json.loads(log.read_text().splitlines()[0])
    assert len(record["layers"]) == len(record["rho"]) == len(record["mask"]) == 16


def test_a_partly_paused_layer_needs_the_optimizer():
    controller = SelectiveMaskController(_model(), MaskConfig(warmup=0, interval=1000))
    _set_grads(controller, lambda i, k, s: torch.randn(s))
    mask = torch.ones(16, 2, dtype=torch.bool)
    mask[0, 0] = False
    controller.set_mask(mask)
    with pytest.raises(ValueError, match="pass the optimizer"):
        controller.apply(None)


def test_an_optimizer_that_is_not_element_wise_is_refused_by_name():
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    controller = SelectiveMaskController(model, MaskConfig(warmup=0, interval=1000))
    _set_grads(controller, lambda i, k, s: torch.randn(s))
    # Adafactor's factored second moment mixes the entries of a row: putting paused ones back cannot undo it
    with pytest.raises(ConfigError, match="cannot pause subspaces under Adafactor"):
        controller.step(torch.optim.Adafactor(params, lr=1e-2))
    controller.step(torch.optim.SGD(params, lr=1e-2, momentum=0.9))  # element-wise: accepted


@pytest.mark.parametrize("optimizer_kind", ["adam", "adamw-foreach"])
def test_masked_subspace_keeps_values_and_adam_state_while_unmasked_one_moves(optimizer_kind):
    model = _model(K=2, m=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_kind == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-2)
    else:  # weight decay moves every column it touches; the paused ones must not move all the same
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    controller = SelectiveMaskController(model, MaskConfig(warmup=5, interval=1000))  # no update in 2 steps
    x = torch.randn(2, 3, 32, 32)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=x).pooler_output.pow(2).sum().backward()
        with subspace_update(model, optimizer, controller):
            optimizer.step()

    step()  # nothing paused yet: Adam state for every parameter
    mask = torch.ones(16, 2, dtype=torch.bool)
    mask[0, 0] = False  # layer 0: subspace 0 paused, subspace 1 trains
    mask[1, :] = False  # layer 1: paused whole
    controller.set_mask(mask)
    layers = [layer for _, layer in controller.layers]

    def columns(layer, k):  # every tensor of subspace k: its values and each Adam moment (the layer's rows)
        cols = layer.subspace_columns(k)
        out = []
        for name in ("U", "s", "V"):
            p = getattr(layer.group, name)
            out.append(p.detach()[layer.index][..., cols].clone())
            moments = [t for t in optimizer.state[p].values() if t.shape == p.shape]
            out += [t[layer.index][..., cols].clone() for t in moments]
        return out

    paused = columns(layers[0], 0) + columns(layers[1], 0) + columns(layers[1], 1)
    moving = columns(layers[0], 1)
    step()
    after = columns(layers[0], 0) + columns(layers[1], 0) + columns(layers[1], 1)
    assert all(torch.equal(a, b) for a, b in zip(paused, after))
    assert all(not torch.equal(a, b) for a, b in zip(moving, columns(layers[0], 1)))
    assert len(paused) == len(after) == 3 * 9  # values and two Adam moments of U, s and V, per subspace
    # the group's step count moves on (its layers share one tensor per factor), paused entries or not
    assert float(optimizer.state[layers[1].group.U]["step"]) == 2


def test_controller_state_round_trips():
    model = _model()
    optimizer = _adam(model)
    a = SelectiveMaskController(model, MaskConfig(warmup=1, interval=1))
    for _ in range(4):
        _set_grads(a, lambda i, k, s: torch.randn(s))
        a.step(optimizer)
        a.restore()
    b = SelectiveMaskController(model, MaskConfig(warmup=1, interval=1))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.learning_state(), b.learning_state())
    assert b.num_steps == a.num_steps == 4

"""MASM adapter layer: decomposition, equivalence, parameter counts; the regularisers and the guard against
plain references (issues 2, 18)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from masm import MASMConfig, apply_masm, merge_masm
from masm.method import (
    MASMLinear,
    count_masm_parameters,
    decomposition,
    layer_groups,
    masm_layers,
    regularizers,
    subspace_update,
)
from masm.models import METHODS, create_detector, load_backbone
from masm.models.backbones import BACKBONES


def _pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reproduces_the_pretrained_backbone_at_init(method):
    reference = load_backbone("tiny-clip")
    detector = create_detector("tiny-clip", method)
    x = _pixels()
    with torch.no_grad():
        expected = reference(pixel_values=x).pooler_output
        got = detector.features(x)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["masm", "effort", "effort-reg", "lora"])
def test_merge_is_equivalent_after_training_like_perturbation(method):
    detector = create_detector("tiny-clip", method)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in detector.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _pixels()
    with torch.no_grad():
        before = detector(x)
        merged = copy.deepcopy(detector).merge()
        after = merged(x)
    assert not any(isinstance(m, MASMLinear) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "out_proj")))
    assert (before - after).abs().max().item() <= 1e-5


def test_only_artifact_parameters_train_and_their_count_follows_the_formula():
    config = MASMConfig(num_subspaces=3, subspace_rank=2)
    model = load_backbone("tiny-clip")
    expected = count_masm_parameters(model, config)
    apply_masm(model, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(n.rsplit(".", 1)[-1] in ("U", "s", "V") for n in trainable)  # one tensor per factor
    # 4 blocks × 4 projections of 64×64: K·m·(64 + 64 + 1) each
    assert expected == 16 * 6 * 129


def test_effort_on_vit_l14_has_effort_parameter_count_without_weights():
    spec = BACKBONES["clip-vit-l14-random"]
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**spec.config))
    config = MASMConfig(num_subspaces=1, subspace_rank=1)
    assert count_masm_parameters(model, config) == 196_704
    head = model.config.hidden_size * 2 + 2
    assert head == 2_050


def test_semantic_part_is_a_buffer_and_the_original_weight_is_not_kept():
    model = apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=2, subspace_rank=2))
    layer = masm_layers(model)[0][1]
    (group,) = model.masm_groups.groups  # every attention projection of tiny-clip has one shape
    assert "weight_sem" in dict(group.named_buffers()) and not layer.weight_sem.requires_grad
    assert [n for n, _ in group.named_parameters()] == ["U", "s", "V"]  # the K=2 subspaces side by side
    assert group.U.shape == (len(masm_layers(model)), 64, 4) and layer.U.shape == (64, 4)
    assert layer.U.data_ptr() == group.U[layer.index].data_ptr()  # a row of the group, not a copy
    # the checkpoint names are the layer's own, and the original weight is not kept
    keys = list(layer.state_dict())
    assert keys[:5] == ["weight_sem", "bias", "U", "s", "V"] and "weight" not in keys
    assert not any("masm_groups" in k for k in model.state_dict())


def test_state_dict_round_trips_and_per_subspace_keys_of_older_checkpoints_load():
    model = apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=2, subspace_rank=2))
    layer = masm_layers(model)[0][1]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (layer.U, layer.s, layer.V):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 64)
    expected = layer(x)
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        fresh.weight_sem.zero_()
        fresh.U.zero_()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    # checkpoints written before the subspaces were batched: U.0, U.1, s.0, ... per subspace
    old = {k: v for k, v in layer.state_dict().items() if k not in ("U", "s", "V")}
    assert "weight_sem" in old and "bias" in old
    for name in ("U", "s", "V"):
        for k in range(2):
            old[f"{name}.{k}"] = getattr(layer, name)[..., layer.subspace_columns(k)].detach().clone()
    with torch.no_grad():
        fresh.U.zero_()
    fresh.load_state_dict(old)
    assert torch.equal(fresh(x), expected)
    with pytest.raises(RuntimeError, match="weight_sem"):
        fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "weight_sem"})


def test_residual_slicing_contiguous_and_interleaved():
    contiguous = decomposition.residual_groups(10, 2, 3, "contiguous")
    interleaved = decomposition.residual_groups(10, 2, 3, "interleaved")
    assert [g.tolist() for g in contiguous] == [[4, 5, 6], [7, 8, 9]]
    assert [g.tolist() for g in interleaved] == [[4, 6, 8], [5, 7, 9]]
    with pytest.raises(ValueError):
        decomposition.residual_groups(8, 4, 2, "contiguous")


def test_svd_cache_is_reused(tmp_path, monkeypatch):
    weight = torch.randn(24, 16)
    first = decomposition.decompose(weight, "float64", tmp_path)
    decomposition._memory.clear()

    def fail(*args, **kwargs):
        raise AssertionError("SVD recomputed although cached")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    second = decomposition.decompose(weight, "float64", tmp_path)
    assert torch.equal(first.S, second.S) and len(list((tmp_path / "svd").iterdir())) == 1


def _layer(guard="off", spectral="artifact", seed=0, guard_rank=0.5):  # 0.5: both storage ways occur
    torch.manual_seed(seed)
    base = nn.Linear(20, 12)
    config = MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        semantic_guard=guard,
        spectral_mode=spectral,
        guard_rank=guard_rank,
    )
    return MASMLinear(base, decomposition.decompose(base.weight, "float64", False), config), base


def test_layer_forward_matches_materialised_weight():
    layer, base = _layer()
    x = torch.randn(5, 20)
    assert torch.allclose(layer(x), base(x), atol=1e-5)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert torch.allclose(layer(x), x @ layer.merged_weight().T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_hand_written_backward_matches_autograd_of_the_formula(bias):
    from masm.method.operands import low_rank_linear

    torch.manual_seed(0)
    d_in, d_out, r = 7, 5, 3
    f64 = torch.float64
    x = torch.randn(2, 4, d_in, dtype=f64, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=f64)
    b = torch.randn(d_out, dtype=f64) if bias else None
    U = torch.randn(d_out, r, dtype=f64, requires_grad=True)
    s = torch.rand(r, dtype=f64, requires_grad=True)
    V = torch.randn(d_in, r, dtype=f64, requires_grad=True)

    def layer(x_, U_, s_, V_):  # operands built from the factors, the gradients through the tokens
        return low_rank_linear(x_, weight, b, U_, s_, V_)

    assert torch.autograd.gradcheck(lambda *a: layer(x, *a), (U, s, V))
    assert torch.autograd.gradcheck(lambda x_: layer(x_, U, s, V), (x,))
    reference = x @ (weight + (U * s) @ V.T).T + (0 if b is None else b)
    assert torch.allclose(layer(x, U, s, V), reference)


def _reference_output(model, x):
    """What the model computes with every MASM layer merged into a plain Linear (a copy)."""
    with torch.no_grad():
        return merge_masm(copy.deepcopy(model))(pixel_values=x).pooler_output


def _trained_tiny_model(seed=0):
    model = apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=2, subspace_rank=2))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.masm_groups.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_every_forward_reads_the_current_factors_whatever_changed_them():
    model, x = _trained_tiny_model(), _pixels()
    (group,) = model.masm_groups.groups
    name, layer = masm_layers(model)[0]

    def check(what):
        got = model(pixel_values=x).pooler_output
        torch.testing.assert_close(got, _reference_output(model, x), atol=1e-5, rtol=1e-5, msg=what)
        single = torch.randn(3, 64)  # a layer called on its own, outside its model's forward
        torch.testing.assert_close(
            layer(single), single @ layer.merged_weight().T + layer.bias, atol=1e-5, rtol=1e-5, msg=what
        )

    check("as built")
    optimizer = torch.optim.Adam(model.masm_groups.parameters(), lr=1e-2, fused=True)
    model(pixel_values=x).pooler_output.pow(2).sum().backward()
    optimizer.step()
    check("after an optimizer step")
    group.U.data.mul_(1.5)  # .data writes keep the version counter: a version-keyed cache missed them
    group.s.data = group.s.data * 0.5
    check("after .data writes")
    state = _trained_tiny_model(seed=1).state_dict()
    model.load_state_dict(state)
    assert torch.equal(layer.U, state[f"{name}.U"])
    check("after load_state_dict")
    with torch.no_grad():
        layer.weight_sem.mul_(0.9)  # a frozen buffer written through the layer's row
    check("after a buffer write")


def test_a_first_forward_under_inference_mode_leaves_training_working():
    model, x = _trained_tiny_model(), _pixels()
    with torch.inference_mode():
        evaluated = model(pixel_values=x).pooler_output
    out = model(pixel_values=x).pooler_output  # "Inference tensors cannot be saved for backward" before
    out.pow(2).sum().backward()
    assert model.masm_groups.groups[0].U.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), evaluated, atol=1e-6, rtol=1e-6)


def test_merge_computes_what_the_layers_compute_and_leaves_no_hooks():
    model, x = _trained_tiny_model(), _pixels()
    expected = model(pixel_values=x).pooler_output.detach()
    merged = merge_masm(copy.deepcopy(model))
    assert not masm_layers(merged) and not hasattr(merged, "masm_groups")
    assert not merged._forward_pre_hooks and not merged._forward_hooks
    torch.testing.assert_close(merged(pixel_values=x).pooler_output, expected, atol=1e-5, rtol=1e-5)
    assert model._forward_pre_hooks  # the copy's merge took nothing from the original
    torch.testing.assert_close(model(pixel_values=x).pooler_output, expected, atol=0, rtol=0)


def test_bf16_autocast_runs_the_hand_written_backward_and_matches_fp32(monkeypatch):
    from masm.method import layer as layer_module

    calls = []
    original = layer_module._LowRankLinear.backward

    def counting(ctx, grad):
        calls.append(grad.dtype)
        return original(ctx, grad)

    monkeypatch.setattr(layer_module._LowRankLinear, "backward", staticmethod(counting))
    layer, base = _layer()
    x = torch.randn(5, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), base(x), atol=0.05)
    out.float().pow(2).sum().backward()
    assert calls == [torch.bfloat16]  # the custom Function, not plain autograd, in the autocast dtype
    bf16_grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    assert all(g.dtype == torch.float32 for g in bf16_grads)  # fp32 factors get fp32 gradients
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    for got, want in zip(bf16_grads, [p.grad for p in layer.parameters() if p.requires_grad]):
        assert torch.allclose(got, want, rtol=0.1, atol=0.1 * want.abs().max().item())


# -- plain references of the regularisers and the guard, written from method.md §3 ---------------------------
def _orthogonality_reference(U, V):
    """``(‖UᵀU − I‖² + ‖VᵀV − I‖²) / (K·m)``: Gram matrices Km×Km, what orthonormal columns mean."""
    eye = torch.eye(U.shape[1])
    return ((U.T @ U - eye).pow(2).sum() + (V.T @ V - eye).pow(2).sum()) / U.shape[1]


def _overlap_reference(U, V, U_g, V_g):
    """``‖U_gᵀ U‖² + ‖V_gᵀ V‖²``: how much of the factors lies in the guarded directions."""
    return (U_g.T @ U).pow(2).sum() + (V_g.T @ V).pow(2).sum()


def _projection_reference(G, B):
    """``G − B Bᵀ G``: ``G`` without its component in the span of the orthonormal columns of ``B``."""
    return G - B @ (B.T @ G)


def _config(guard="off", spectral="artifact", guard_rank=0.5, **weights):
    return MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        semantic_guard=guard,
        spectral_mode=spectral,
        guard_rank=guard_rank,
        **weights,
    )


@pytest.mark.parametrize("guard", ["off", "penalty"])
def test_orthogonality_term_follows_its_definition_and_its_gradient_repairs_a_violation(guard):
    layer, _ = _layer(guard)
    config = _config(guard)
    assert regularizers(layer, config)["orth"].item() < 1e-6  # orthonormal singular vectors at init
    with torch.no_grad():
        U0, _, V0 = layer.subspace(0)
        U1, _, _ = layer.subspace(1)
        U1.copy_(U0 + 0.3 * U1)  # overlap between subspaces
        V0.mul_(1.5)  # non-unit columns
    before = regularizers(layer, config)["orth"]
    expected = _orthogonality_reference(layer.U.detach(), layer.V.detach())
    assert torch.allclose(before, expected, rtol=1e-5)  # the guard penalty is not part of it
    # the orientation of Effort's DeepfakeBench copy (QQᵀ, d×d) measures something else: this test can tell
    U, V = layer.U.detach(), layer.V.detach()
    wrong = ((U @ U.T - torch.eye(12)).pow(2).sum() + (V @ V.T - torch.eye(20)).pow(2).sum()) / 4
    assert not torch.allclose(wrong, expected, rtol=1e-2)
    before.backward()
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    assert regularizers(layer, config)["orth"].item() < before.item()


def _semantic_bases(base, guard_rank):
    """U_g, V_g: the guarded top principal directions, straight from the SVD (the layer may store a
    complement instead)."""
    svd = decomposition.decompose(base.weight, "float64", False)
    return svd.U[:, :guard_rank].float(), svd.Vh[:guard_rank].T.float()


def test_guard_covers_the_top_r_g_directions_clamped_to_the_principal_rank():
    assert _layer("project")[0].guard_rank == 6  # half of n = 12
    assert _layer("project", guard_rank=1.0)[0].guard_rank == 8  # r = n - K·m = 12 - 4


def test_guard_penalty_is_its_own_term_and_detects_drift_into_the_semantic_subspace():
    layer, base = _layer("penalty", guard_rank=0.75)
    config = _config("penalty", guard_rank=0.75)
    U_sem, V_sem = _semantic_bases(base, layer.guard_rank)
    assert layer.u_complement and not layer.v_complement  # 12×20: both ways of storing the guard
    assert regularizers(layer, config)["guard"].item() < 1e-5  # fp32 round-off of ‖Q‖² − ‖BᵀQ‖²
    with torch.no_grad():
        layer.subspace(0)[0][:, 0].copy_(U_sem[:, 0])
        layer.subspace(1)[2][:, 1].copy_(V_sem[:, 2])
    U, V = layer.U.detach(), layer.V.detach()
    overlap = _overlap_reference(U, V, U_sem, V_sem)
    assert overlap.item() > 1.9  # two unit columns moved into the guarded span
    terms = regularizers(layer, config)
    assert torch.allclose(terms["guard"], overlap / 4, atol=1e-5)  # over K·m, as L_orth
    assert torch.allclose(terms["orth"], _orthogonality_reference(U, V), rtol=1e-5)
    # its own weight: without L_orth the guard stays, without the guard's weight it goes
    assert set(regularizers(layer, _config("penalty", guard_rank=0.75, lambda_orth=0.0))) == {"guard", "spec"}
    # layers without the penalty have no guard term
    assert "guard" not in regularizers(_layer("off")[0], _config("off"))


def test_total_loss_weighs_each_term_by_its_own_lambda_and_logs_it():
    from masm.method import total_loss

    layer, _ = _layer("penalty")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    config = _config("penalty", lambda_orth=0.5, lambda_spec=2.0, lambda_guard=3.0)
    loss, logged = total_loss(logits, labels, layer, config)
    assert list(logged) == ["cls", "orth", "guard", "spec", "total"]
    assert logged["guard"].item() > 1e-3 and logged["orth"].item() > 1e-3
    expected = logged["cls"] + 0.5 * logged["orth"] + 3.0 * logged["guard"] + 2.0 * logged["spec"]
    assert torch.allclose(loss.detach(), expected) and torch.equal(logged["total"], loss.detach())
    # λ_guard = λ_orth is the objective of before the guard had its own weight: λ_orth · (orth + guard)
    same = _config("penalty", lambda_orth=0.5, lambda_guard=0.5)
    loss, logged = total_loss(logits, labels, layer, same)
    old = logged["cls"] + 0.5 * (logged["orth"] + logged["guard"]) + logged["spec"]
    assert torch.allclose(loss.detach(), old)
    # explicit auxiliary terms join the objective, weighted; a plain module has none of its own
    loss_aux, logged = total_loss(logits, labels, layer, same, auxiliary={"extra": (2.0, torch.tensor(0.25))})
    assert torch.allclose(loss_aux.detach(), loss.detach() + 0.5) and logged["extra"].item() == 0.25


@pytest.mark.parametrize("mode", ["artifact", "energy"])
def test_spectral_loss_is_zero_at_init_and_matches_its_definition(mode):
    layer, base = _layer(spectral=mode)
    assert layer.spectral_loss(mode).item() < 1e-6  # fp32 round-off of a relative energy
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    got = layer.spectral_loss(mode)
    if mode == "artifact":
        sub = [layer.subspace(k) for k in range(2)]
        sig = [torch.linalg.svdvals(U @ torch.diag(s) @ V.T)[:2] for U, s, V in sub]
        expected = (torch.stack(sig) - layer.sigma0).pow(2).sum() / base.weight.detach().pow(2).sum()
    else:
        w0 = base.weight.detach().pow(2).sum()
        expected = (layer.merged_weight().pow(2).sum() - w0).abs() / w0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    got.backward()
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    assert layer.spectral_loss(mode).item() < got.item()


def test_project_mode_keeps_gradients_orthogonal_to_the_semantic_subspace():
    layer, base = _layer("project")
    U_sem, V_sem = _semantic_bases(base, layer.guard_rank)
    x = torch.randn(7, 20)
    layer(x).pow(2).sum().backward()
    raw_u, raw_v = layer.grad("U").clone(), layer.grad("V").clone()
    (group,) = layer_groups([layer])
    group.project_gradients_()
    assert torch.allclose(layer.grad("U"), _projection_reference(raw_u, U_sem), atol=1e-6)
    assert torch.allclose(layer.grad("V"), _projection_reference(raw_v, V_sem), atol=1e-6)
    assert (U_sem.T @ layer.grad("U")).abs().max().item() <= 1e-6
    assert (V_sem.T @ layer.grad("V")).abs().max().item() <= 1e-6
    # the reference tells the complement from the guarded span (a projection onto the wrong one fails)
    assert not torch.allclose(layer.grad("U"), U_sem @ (U_sem.T @ raw_u), atol=1e-3)
    assert layer.grad("U").abs().max().item() > 0


def _square_layer(guard, guard_rank=0.5, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(64, 64)
    config = MASMConfig(num_subspaces=2, subspace_rank=4, semantic_guard=guard, guard_rank=guard_rank)
    return MASMLinear(base, decomposition.decompose(base.weight, "float64", False), config), base


def _train_steps(layer, steps=300, seed=0, guard=True):
    """AdamW with weight decay on a random regression target; with ``guard`` the optimizer step is wrapped
    as the trainer wraps it (gradients projected before, parameters re-projected after)."""
    torch.manual_seed(seed)
    target = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(
        [p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for _ in range(steps):
        x = torch.randn(32, 64)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        if guard:
            with subspace_update(layer, optimizer, groups=[layer]):
                optimizer.step()
        else:
            optimizer.step()


def _overlap_fraction(layer, base):
    """``(‖U_gᵀ U‖² + ‖V_gᵀ V‖²) / (‖U‖² + ‖V‖²)`` of the stored factors: 0 when the guard holds."""
    U_g, V_g = _semantic_bases(base, layer.guard_rank)
    U, V = layer.U.detach(), layer.V.detach()
    return float(_overlap_reference(U, V, U_g, V_g) / (U.pow(2).sum() + V.pow(2).sum()))


def test_project_guard_holds_exactly_after_300_adamw_steps_with_weight_decay():
    layer, base = _square_layer("project")
    _train_steps(layer)
    assert _overlap_fraction(layer, base) <= 1e-5
    assert (layer.merged_weight() - _square_layer("project")[0].merged_weight()).norm() > 1e-3  # it moved
    # without the guard's steps, Adam's per-element scaling and weight decay leak into the guarded span
    leaky, base = _square_layer("project")
    _train_steps(leaky, guard=False)
    assert _overlap_fraction(leaky, base) > 1e-3


def test_deep_copy_keeps_the_guard():
    layer, base = _square_layer("project")
    clone = copy.deepcopy(layer)
    assert clone.group is not layer.group and clone.U_basis.data_ptr() != layer.U_basis.data_ptr()
    assert torch.equal(clone.U_basis, layer.U_basis)
    _train_steps(clone, steps=50)
    assert _overlap_fraction(clone, base) <= 1e-5
    # and a copy computes what the original computes, through operands built from its own tensors
    x = torch.randn(8, 64)
    fresh, _ = _square_layer("project")
    fresh(x)
    twin = copy.deepcopy(fresh)
    assert torch.equal(twin(x), fresh(x))


def test_with_r_g_below_r_the_learned_change_leaves_the_initial_residual_span():
    layer, base = _square_layer("project", guard_rank=0.5)
    svd = decomposition.decompose(base.weight, "float64", False)
    residual_u = svd.U[:, 56:].float()  # the initial residual span: the last K·m = 8 directions
    residual_v = svd.Vh[56:].T.float()
    _train_steps(layer, steps=100)
    change = (layer.merged_weight() - base.weight).detach()
    inside = residual_u @ (residual_u.T @ change @ residual_v) @ residual_v.T
    assert (change - inside).norm() / change.norm() > 0.5
    # a guard over all r principal directions would keep it inside (what method.md §3 corrected)
    tight, base = _square_layer("project", guard_rank=1.0)
    _train_steps(tight, steps=100)
    change = (tight.merged_weight() - base.weight).detach()
    inside = residual_u @ (residual_u.T @ change @ residual_v) @ residual_v.T
    assert (change - inside).norm() / change.norm() < 1e-3


def test_regularizers_average_over_layers_and_skip_zero_weights():
    model = apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=2, subspace_rank=2))
    terms = regularizers(model, MASMConfig(num_subspaces=2, subspace_rank=2))
    assert set(terms) == {"orth", "spec"} and all(v.item() < 1e-8 for v in terms.values())
    assert regularizers(model, MASMConfig(lambda_orth=0.0, lambda_spec=0.0)) == {}
    config = MASMConfig(num_subspaces=2, subspace_rank=2, semantic_guard="penalty")
    penalised = apply_masm(load_backbone("tiny-clip"), config)
    assert set(regularizers(penalised, config)) == {"orth", "guard", "spec"}
    weightless = MASMConfig(num_subspaces=2, subspace_rank=2, lambda_orth=0.0, lambda_spec=0.0)
    assert regularizers(penalised, weightless) == {"guard": regularizers(penalised, config)["guard"]}


def test_merge_masm_restores_plain_linears():
    model = apply_masm(load_backbone("tiny-clip"), MASMConfig(num_subspaces=2, subspace_rank=2))
    merge_masm(model)
    assert not masm_layers(model)


@pytest.mark.parametrize("guard", ["off", "penalty", "project"])
@pytest.mark.parametrize("spectral", ["artifact", "energy"])
def test_batched_regularizers_equal_the_mean_of_plain_per_layer_references(guard, spectral):
    config = MASMConfig(num_subspaces=2, subspace_rank=3, semantic_guard=guard, spectral_mode=spectral)
    pretrained = load_backbone("tiny-clip")
    model = apply_masm(copy.deepcopy(pretrained), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    layers = masm_layers(model)
    terms = regularizers(model, config)
    U_V = [(layer.U.detach(), layer.V.detach()) for _, layer in layers]
    orth = torch.stack([_orthogonality_reference(U, V) for U, V in U_V]).mean()
    spec = torch.stack([layer.spectral_loss(spectral) for _, layer in layers]).mean()
    assert torch.allclose(terms["orth"], orth, rtol=1e-5) and torch.allclose(terms["spec"], spec, rtol=1e-4)
    assert ("guard" in terms) == (guard == "penalty")
    if guard == "penalty":
        overlaps = []
        for (name, layer), (U, V) in zip(layers, U_V):
            U_g, V_g = _semantic_bases(pretrained.get_submodule(name), layer.guard_rank)
            overlaps.append(_overlap_reference(U, V, U_g, V_g) / 6)  # over K·m
        assert torch.allclose(terms["guard"], torch.stack(overlaps).mean(), rtol=1e-4)


def test_a_forward_whose_factors_changed_before_its_backward_fails_loudly():
    layer, _ = _layer()
    x = torch.randn(4, 20)
    first = layer(x).sum()
    with torch.no_grad():
        layer.s.mul_(2)
    layer(x)  # rebuilds the operands the first forward saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


def test_the_layer_passes_contiguous_rows_to_the_next_operation():
    """CUDA's attention kernels reject strided rows (seen on an H100 when the low-rank terms rode along as
    extra columns of the layer's matmul: "query is not correctly aligned", and cuDNN's attention backward
    failing); the layer's output and its input gradient are contiguous, with no copy. The meta device
    stands in for CUDA: same code path, shapes and strides only."""
    from masm.method.operands import low_rank_linear

    d_in, d_out, km = 6, 5, 3
    for device in ("cpu", "meta"):
        x = torch.randn(2, 4, d_in, device=device, requires_grad=True)
        U = torch.randn(d_out, km, device=device, requires_grad=True)
        s = torch.rand(km, device=device, requires_grad=True)
        V = torch.randn(d_in, km, device=device, requires_grad=True)
        weight, bias = torch.randn(d_out, d_in, device=device), torch.randn(d_out, device=device)
        out = low_rank_linear(x, weight, bias, U, s, V)
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert out.shape == (2, 4, d_out) and grad_x.shape == x.shape
        assert out.is_contiguous() and grad_x.is_contiguous(), device


# a rectangular layer (bases stored), and a square one guarding most directions (complements stored)
@pytest.mark.parametrize("shape, guard_rank", [((20, 12), 0.5), ((64, 64), 0.75)])
def test_group_guard_equals_the_plain_projection_of_every_layer(shape, guard_rank):
    from masm.method import LayerGroup, project_gradients, reproject_guarded
    from masm.method.apply import group_layers

    d_in, d_out = shape
    config = MASMConfig(num_subspaces=2, subspace_rank=2, semantic_guard="project", guard_rank=guard_rank)
    layers, bases = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out)
        layers.append(MASMLinear(base, decomposition.decompose(base.weight, "float64", False), config))
        bases.append(_semantic_bases(base, layers[-1].guard_rank))
    model = nn.Sequential(*layers)
    group_layers(model, layers)
    (group,) = layer_groups(model)
    assert isinstance(group, LayerGroup) and len(group) == 3 and [la.index for la in layers] == [0, 1, 2]
    assert layers[0].u_complement == (d_in == d_out)  # both ways of storing the basis are exercised
    x = torch.randn(5, d_in)
    for layer in layers:  # each on its own (outside a model's forward: its operands are built for it alone)
        layer(x).pow(2).sum().backward()
    raw = [(layer.grad("U").clone(), layer.grad("V").clone()) for layer in layers]
    project_gradients(model, [group])
    for layer, (U_g, V_g), (grad_u, grad_v) in zip(layers, bases, raw):
        assert torch.allclose(layer.grad("U"), _projection_reference(grad_u, U_g), atol=1e-6)
        assert torch.allclose(layer.grad("V"), _projection_reference(grad_v, V_g), atol=1e-6)
    with torch.no_grad():
        for layer in layers:
            layer.U.add_(0.05)  # leave the complement, as Adam's scaling does
            layer.V.add_(0.05)
    moved = [(layer.U.detach().clone(), layer.V.detach().clone()) for layer in layers]
    reproject_guarded(model, [group], skip=torch.tensor(True))  # a refused step: nothing moves
    assert all(torch.equal(la.U, U) and torch.equal(la.V, V) for la, (U, V) in zip(layers, moved))
    reproject_guarded(model, [group])
    for layer, (U_g, V_g), (U, V) in zip(layers, bases, moved):
        assert _overlap_reference(U, V, U_g, V_g).item() > 1e-3  # there was something to remove
        assert torch.allclose(layer.U, _projection_reference(U, U_g), atol=1e-6)
        assert torch.allclose(layer.V, _projection_reference(V, V_g), atol=1e-6)
        assert _overlap_reference(layer.U.detach(), layer.V.detach(), U_g, V_g).item() <= 1e-9


def test_two_forwards_before_one_backward_get_their_own_operands():
    """The group writes a pass's operands into the previous pass's storage only once nothing holds it: a
    forward still awaiting its backward keeps its own."""
    model, x = _trained_tiny_model(), _pixels()
    (group,) = model.masm_groups.groups
    first = model(pixel_values=x).pooler_output.pow(2).sum()
    second = model(pixel_values=x * 0.5).pooler_output.pow(2).sum()
    (first + second).backward()
    together = group.U.grad.clone()
    group.U.grad = None
    model(pixel_values=x).pooler_output.pow(2).sum().backward()
    model(pixel_values=x * 0.5).pooler_output.pow(2).sum().backward()  # reuses the storage, then adds up
    torch.testing.assert_close(group.U.grad, together, atol=1e-6, rtol=1e-5)

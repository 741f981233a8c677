"""``compile: true``: MASM layers trace without a graph break, and compiled training equals eager (issue 17)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from masm import MASMConfig
from masm.method import MASMLinear, decomposition
from masm.training import load_train_config, train
from test_train_support import TINY_CONFIG, make_folder_dataset, tiny_overrides


def _layer():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    config = MASMConfig(num_subspaces=2, subspace_rank=2, semantic_guard="project")
    return MASMLinear(base, decomposition.decompose(base.weight, "float64", False), config)


def test_a_masm_layer_traces_forward_and_backward_without_a_graph_break():
    layer = _layer()
    x = torch.randn(2, 5, 24, requires_grad=True)

    def step(module, x):
        out = module(x)
        out.pow(2).sum().backward()  # through the compiled backward graph when module is compiled
        return out

    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    # compiled forward and backward (the hand-written backward traced by AOTAutograd) equal eager
    eager_out = step(layer, x)
    eager_grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break is an error
    out = step(compiled, x)
    grads = [p.grad for p in layer.parameters()] + [x.grad]
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=4, n_fake=4)
    finals = {}
    for compiled in (False, True):
        overrides = tiny_overrides(
            data, **{"data.val": "none", "max_steps": 3, "compile": str(compiled).lower()}
        )
        result = train(load_train_config(TINY_CONFIG, overrides), tmp_path / f"c{compiled}", progress=False)
        finals[compiled] = load_file(str(result.last_checkpoint / "model.safetensors"))
    torch._dynamo.reset()
    assert finals[True].keys() == finals[False].keys()
    for key, want in finals[False].items():
        torch.testing.assert_close(finals[True][key], want, atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_the_speed_benchmark_times_a_compiled_step():
    from masm.benchmarks import speed

    settings = speed.SpeedSettings(backbone="tiny-clip", batch_size=2, compile=True)
    step = speed._TrainingStep("masm", settings, torch.device("cpu"))
    before = step.detector.backbone.masm_groups.groups[0].U.detach().clone()
    step()
    step()
    assert step.forward is not step.detector  # the compiled module ran the steps
    assert not torch.equal(step.detector.backbone.masm_groups.groups[0].U, before)
    torch._dynamo.reset()

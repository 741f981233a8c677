"""``cuda_graph: true``: what a captured training step relies on, checked on the CPU.

The capture itself needs CUDA (``make gpu-check`` trains with it and compares with eager). Here the
graph's body runs eagerly at every step it would replay (``CapturedStep(capture=False)``), which shows that
it trains as the eager loop does, that it keeps every tensor it reads or writes in place across steps
(a replay reads the addresses the capture saw), and that it never waits for the device.
"""

from __future__ import annotations

import json

import pytest
import torch

from masm.benchmarks.speed import count_dispatched_ops
from masm.errors import ConfigError
from masm.training import cuda_graph, load_train_config, train
from masm.training.state import flatten_optimizer
from test_train_support import TINY_CONFIG, make_folder_dataset, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "fx")  # 12 frames
    (root / "real" / "broken.png").write_bytes(b"not a png")  # a batch that shrinks: an eager step
    return root


def _config(data, **extra):
    overrides = {"data.val": "none", "epochs": 3, "data.max_failed_share": 0.5, **extra}
    return load_train_config(TINY_CONFIG, tiny_overrides(data, **overrides))


class _Recorder(cuda_graph.CapturedStep):
    """The captured step run eagerly, recording which steps it took and the tensors it kept."""

    def __init__(self, run):
        super().__init__(run, capture=False)
        self.steps: list[int] = []
        self.addresses: list[dict[str, int]] = []
        self.syncs: list[int] = []

    def step(self, run, batch):
        self.steps.append(run.progress.global_step + 1)
        out = super().step(run, batch)
        self.addresses.append(_addresses(run, self))
        return out

    def _body(self, run):
        outputs = []
        _, syncs = count_dispatched_ops(lambda: outputs.append(super(_Recorder, self)._body(run)))
        self.syncs.append(syncs)
        return outputs[0]


def _addresses(run, captured) -> dict[str, int]:
    """Where every tensor lives that a replay of the step reads or writes, besides its temporaries."""
    found = {f"param.{n}": p.data_ptr() for n, p in run.detector.named_parameters() if p.requires_grad}
    for i, p in enumerate(run.optimizer.param_groups[0]["params"]):
        for key, value in run.optimizer.state.get(p, {}).items():
            found[f"optimizer.{i}.{key}"] = value.data_ptr()
    found["lr"] = run.optimizer.param_groups[0]["lr"].data_ptr()
    controller = run.controller
    for name in ("_mu", "_nu", "_columns", "_paused"):
        for i, tensor in enumerate(getattr(controller, name)):
            found[f"mask.{name}.{i}"] = tensor.data_ptr()
    found["mask.observed"] = controller._observed.data_ptr()
    found["health.poisoned"] = run.health.poisoned.data_ptr()
    found["input.pixels"] = captured.pixels.data_ptr()
    found["input.labels"] = captured.labels.data_ptr()
    for g, group in enumerate(run.layer_groups):
        for i, tensor in enumerate(group.__dict__["_operands"]):
            if tensor is not None:
                found[f"operands.{g}.{i}"] = tensor.untyped_storage().data_ptr()
    return found


def _trainable(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / "last" / "model.safetensors")


def test_the_captured_steps_train_as_the_eager_loop(tmp_path, data, monkeypatch):
    train(_config(data), tmp_path / "eager", progress=False)
    made = []
    monkeypatch.setattr(cuda_graph, "make_captured_step", lambda run: made.append(_Recorder(run)) or made[-1])
    result = train(_config(data, cuda_graph="true"), tmp_path / "graph", progress=False)
    recorder = made[0]
    # 13 frames in batches of 4: 4 steps an epoch, the last of 1 frame (or 0 when it holds the broken one);
    # the mask (warm-up 2, interval 2) is recomputed at steps 3, 5, ... : those are eager, the rest captured
    assert result.global_step == 12 and result.frames_failed == 3
    assert recorder.steps and set(recorder.steps).isdisjoint({3, 5, 7, 9, 11})
    assert not {4, 8, 12} & set(recorder.steps)  # the short or shrunk batches (an epoch's last)
    assert recorder.syncs and set(recorder.syncs) == {0}  # the body never waits for the device
    eager, graph = _trainable(tmp_path / "eager"), _trainable(tmp_path / "graph")
    assert eager.keys() == graph.keys()
    for name in eager:  # the learning rate is a float32 tensor here, a double there: round-off apart
        torch.testing.assert_close(
            graph[name], eager[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: n + m
        )
    eager_masks, graph_masks = (
        [json.loads(line) for line in (tmp_path / run / "masks.jsonl").read_text().splitlines()]
        for run in ("eager", "graph")
    )
    assert [m["mask"] for m in graph_masks] == [m["mask"] for m in eager_masks]
    assert [m["step"] for m in graph_masks] == [m["step"] for m in eager_masks]
    for ours, theirs in zip(graph_masks, eager_masks):
        torch.testing.assert_close(torch.tensor(ours["rho"]), torch.tensor(theirs["rho"]), atol=1e-4, rtol=0)


def test_the_captured_step_keeps_its_tensors_in_place(tmp_path, data, monkeypatch):
    made = []
    monkeypatch.setattr(cuda_graph, "make_captured_step", lambda run: made.append(_Recorder(run)) or made[-1])
    mask_every_4 = {"model.method.masm.mask.interval": 4}  # recomputed at steps 3, 7, 11, 15
    train(_config(data, cuda_graph="true", epochs=4, **mask_every_4), tmp_path / "graph", progress=False)
    recorder = made[0]
    masked = [a for a in recorder.addresses if "mask._columns.0" in a]
    # of steps 5, 6, 9, 10, 13 and 14 (after the mask was set, recomputed between), those without the
    # broken frame (which lands in one of an epoch's first 3 batches)
    assert len(masked) >= 4
    for later in masked[1:]:
        moved = [k for k in masked[0] if later.get(k) != masked[0][k]]
        assert not moved, f"moved between captured steps: {moved}"


def test_cuda_graph_is_refused_where_it_cannot_run(tmp_path, data):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        _config(data, cuda_graph="true", **{"optim.grad_accum_steps": 2})
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(_config(data, cuda_graph="true", device="cpu"), tmp_path / "cpu", progress=False)


def test_the_speed_benchmark_refuses_a_captured_step_off_cuda(monkeypatch, capsys):
    assert run_cli(["bench", "speed", "--cuda-graph", "--device", "cpu"], monkeypatch) != 0
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_a_capturable_optimizer_checkpoints_and_resumes(tmp_path, data, monkeypatch):
    monkeypatch.setattr(cuda_graph, "make_captured_step", lambda run: cuda_graph.CapturedStep(run, False))
    whole = tmp_path / "whole"
    train(_config(data, cuda_graph="true"), whole, progress=False)
    part = tmp_path / "part"

    def stop_at_6(progress):  # checkpoint_every 2: step 6's is the last
        if progress.global_step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(data, cuda_graph="true"), part, progress=False, on_step=stop_at_6)
    result = train(_config(data, cuda_graph="true"), part, resume=True, progress=False)
    assert result.resumed_from is not None and result.global_step == 12
    for name, tensor in _trainable(whole).items():
        torch.testing.assert_close(_trainable(part)[name], tensor, msg=lambda m, n=name: n + m)


def test_the_learning_rate_tensor_is_saved_as_a_number():
    param = torch.nn.Parameter(torch.zeros(3))
    from masm.training import make_optimizer
    from masm.training.optim import set_lr

    optimizer = make_optimizer([param], "adam", capturable=True, lr=1e-3)
    lr = optimizer.param_groups[0]["lr"]
    set_lr(optimizer, 5e-4)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4)
    _, skeleton = flatten_optimizer(optimizer)
    assert skeleton["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert isinstance(skeleton["param_groups"][0]["lr"], float)

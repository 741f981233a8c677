"""``cuda_graph: true`` under DDP (``torchrun``, 2 processes, gloo on CPU): the ranks take the graph's step
at the same steps, and the run trains as eager DDP does.

The capture needs CUDA; here each rank runs the graph's body eagerly where it would replay
(``tests/graph_rank_entry.py``). What DDP adds to a captured step is checked: a graph launch holding a
collective must happen on every rank alike, so a rank whose frames failed sends every rank to an eager
step (the host-side vote), and the step's sample counts reach the graph's all-reduce.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from masm.training.trainer import STATE_HASH_ENV
from test_train_support import TINY_CONFIG, make_folder_dataset, tiny_overrides

ENTRY = Path(__file__).with_name("graph_rank_entry.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data: Path, out: Path, record: Path, **extra) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(ENTRY)]
    # 17 frames, 2 per rank a step: 5 steps an epoch, the last short on both ranks; the broken frame
    # shrinks one rank's batch once an epoch. The mask is recomputed at steps 3, 7 and 11.
    settings = {"epochs": 3, "data.val": "none", "data.max_failed_share": 0.5, **extra}
    settings["model.method.masm.mask.interval"] = 4
    argv = launcher + ["train", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    argv += [arg for item in tiny_overrides(data, **settings) for arg in ("--set", item)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASM_TEST_GRAPH_RECORD=str(record))
    env[STATE_HASH_ENV] = str(record)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ranks_replay_together_and_train_as_eager_ddp(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=8, n_fake=8)
    (data / "real" / "broken.png").write_bytes(b"not a png")
    _torchrun(data, tmp_path / "eager", tmp_path / "eager-record")
    _torchrun(data, tmp_path / "graph", tmp_path / "graph-record", cuda_graph="true")

    ranks = [
        json.loads((tmp_path / "graph-record" / f"graph_steps_rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert ranks[0]["graph_steps"] == ranks[1]["graph_steps"]  # the vote: every rank alike
    unfit = set(ranks[0]["unfit_steps"]) | set(ranks[1]["unfit_steps"])
    graph_steps = set(ranks[0]["graph_steps"])
    assert graph_steps and not graph_steps & unfit
    assert set(ranks[0]["unfit_steps"]) != set(ranks[1]["unfit_steps"])  # the broken frame: one rank's
    assert unfit | graph_steps == set(range(1, 16))  # every step taken one way or the other
    hashes = [json.loads((tmp_path / "graph-record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert hashes[0]["params"] == hashes[1]["params"] and hashes[0]["global_step"] == 15

    eager = load_file(tmp_path / "eager" / "checkpoints" / "last" / "model.safetensors")
    graph = load_file(tmp_path / "graph" / "checkpoints" / "last" / "model.safetensors")
    for name in eager:  # the learning rate is a float32 tensor there, a double here: round-off apart
        torch.testing.assert_close(
            graph[name], eager[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: n + m
        )
    logs = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("eager", "graph")
    }
    trained = {run: [r for r in records if r["kind"] == "train"] for run, records in logs.items()}
    assert [r["frames_failed"] for r in trained["graph"]] == [r["frames_failed"] for r in trained["eager"]]
    assert trained["graph"][-1]["frames_failed"] == 3  # counted through the graph's all-reduce too
    assert all("graph_replays" in r for r in trained["graph"])

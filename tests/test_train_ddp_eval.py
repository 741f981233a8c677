"""Multi-process runs that finish: the test sets are scored by every rank, and an error on one rank
stops every rank at once (2 processes, gloo on CPU)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from masm.evaluation.evaluate import evaluate_checkpoint
from test_train_support import TINY_CONFIG, cli_command, make_folder_dataset, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_argv(tmp_path, data, out, **extra) -> list[str]:
    argv = cli_command(tmp_path) + ["train", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    return argv + [arg for item in tiny_overrides(data, **extra) for arg in ("--set", item)]


def test_torchrun_two_processes_score_the_test_set_together(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=5, n_fake=6)  # 11 frames: uneven shards
    out = tmp_path / "run"
    extra = {"data.val": "none", "data.test": f"[folder:{data}]"}
    argv = _train_argv(tmp_path, data, out, epochs=1, max_steps=1, **extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    prefix = cli_command(tmp_path)  # [python, -m, masm] or [python, shim]
    launcher += prefix[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        launcher + argv[len(prefix) :], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["meta"]["processes"] == 2
    # every frame was scored once, and as one process scores it
    scores = _predictions(out / "eval" / "predictions.csv")
    assert len(scores) == 11
    evaluate_checkpoint(
        out / "checkpoints" / "best",
        [f"folder:{data}"],
        out_dir=tmp_path / "alone",
        frames=4,
        device="cpu",
        progress=False,
    )
    alone = _predictions(tmp_path / "alone" / "predictions.csv")
    assert alone.keys() == scores.keys()
    np.testing.assert_allclose([scores[k] for k in alone], list(alone.values()), rtol=0, atol=1e-6)


def _predictions(path) -> dict[str, float]:
    with path.open() as fh:
        header, *rows = list(csv.reader(fh))
    path_col, score_col = header.index("path"), header.index("score")
    assert len({row[path_col] for row in rows}) == len(rows)
    return {row[path_col]: float(row[score_col]) for row in rows}


def test_an_error_on_one_rank_stops_every_rank_with_it(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=4, n_fake=3)
    (data / "fake" / "fam1" / "broken.png").write_bytes(b"not a png")  # 8 frames, one rank draws this
    argv = _train_argv(
        tmp_path, data, tmp_path / "run", epochs=1, **{"data.batch_size": 2, "data.val": "none"}
    )
    port = _free_port()
    # launched as a cluster scheduler does (one process per rank, no torchrun agent to kill the others)
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            MASM_DIST_TIMEOUT_S="600",
        )
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    errors = [proc.communicate(timeout=240)[1] for proc in procs]
    assert time.monotonic() - started < 120  # not the 600 s timeout
    assert all(proc.returncode != 0 for proc in procs), errors
    failing = [i for i, err in enumerate(errors) if "every frame of a training batch failed" in err]
    assert len(failing) >= 1, errors
    for rank, err in enumerate(errors):
        assert "broken.png" in err, f"rank {rank}: {err[-2000:]}"
        if rank not in failing:
            assert f"rank {rank} stops because rank {failing[0]} failed: DataError" in err, err[-2000:]

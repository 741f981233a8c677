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
from masm.training.trainer import STATE_HASH_ENV
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


_FAIL_ON_RANK_1 = """
import sys
import masm.cli.main as cli
import masm.training.loop as loop
from masm.errors import DataError

real_step = loop._optimizer_step

def failing_step(run):  # rank 1 alone fails, while rank 0 waits in the step's all-reduce
    if run.env.rank == 1 and run.progress.global_step == 1:
        raise DataError("injected failure: frame x.png cannot be read")
    return real_step(run)

loop._optimizer_step = failing_step
sys.exit(cli.main())
"""


def _launch_ranks(argv: list[str], port: int, logs, extra_env=None) -> list[subprocess.Popen]:
    """Both ranks launched as a cluster scheduler does (no torchrun agent to kill the others)."""
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
            **(extra_env or {}),
        )
        out, err = (open(logs / f"rank{rank}.{kind}", "w") for kind in ("out", "err"))
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True))
    return procs


def _wait(procs, logs, timeout: float = 240) -> tuple[list[float], list[str], list[str]]:
    """Exit times (monotonic), stdout and stderr of each rank."""
    ended = [None, None]
    deadline = time.monotonic() + timeout
    while None in ended and time.monotonic() < deadline:
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    read = [[(logs / f"rank{r}.{k}").read_text() for r in (0, 1)] for k in ("out", "err")]
    return ended, read[0], read[1]


def test_an_error_on_one_rank_stops_every_rank_with_its_message_and_status_1(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=4, n_fake=4)
    shim = tmp_path / "fail_rank1.py"
    shim.write_text(_FAIL_ON_RANK_1)
    argv = [
        sys.executable,
        str(shim),
        "train",
        str(TINY_CONFIG),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    extra = {"data.batch_size": 2, "data.val": "none"}
    argv += [a for item in tiny_overrides(data, epochs=1, **extra) for a in ("--set", item)]
    procs = _launch_ranks(argv, _free_port(), tmp_path)
    ended, _, errors = _wait(procs, tmp_path)
    assert None not in ended, errors
    assert abs(ended[0] - ended[1]) < 30  # the other rank does not wait for the process group's timeout
    assert [proc.returncode for proc in procs] == [1, 1], errors
    for rank, err in enumerate(errors):
        assert "injected failure: frame x.png cannot be read" in err, f"rank {rank}: {err[-2000:]}"
        assert "Traceback" not in err, f"rank {rank}: {err[-2000:]}"
    assert "rank 0 stops because rank 1 failed: DataError" in errors[0], errors[0][-2000:]


def test_a_batch_that_failed_on_one_rank_is_skipped_alike_and_counted(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=4, n_fake=3)
    (data / "fake" / "fam1" / "broken.png").write_bytes(b"not a png")  # 8 frames, one rank draws this alone
    hashes = tmp_path / "hashes"
    extra = {"data.batch_size": 2, "data.val": "none", "data.max_failed_share": 0.2}
    argv = _train_argv(tmp_path, data, tmp_path / "run", epochs=1, **extra)
    procs = _launch_ranks(argv, _free_port(), tmp_path, {STATE_HASH_ENV: str(hashes)})
    _, outs, errors = _wait(procs, tmp_path)
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for err in errors]
    assert "1 training samples failed to load or forge" in outs[0]
    assert any("broken.png" in err for err in errors)  # logged with its path on the rank that drew it
    rank0, rank1 = (json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["params"] == rank1["params"] and rank0["global_step"] == rank1["global_step"] == 4
    train_records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert train_records[-1]["frames_failed"] == 1  # summed over ranks

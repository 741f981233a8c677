"""The same `masm train` under torchrun (2 processes, gloo on CPU): ranks end with identical state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from safetensors.torch import load_file

from masm.training.trainer import STATE_HASH_ENV, parameter_hash
from test_train_support import TINY_CONFIG, cli_command, make_folder_dataset, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_agree(tmp_path):
    data = make_folder_dataset(tmp_path / "fx", n_real=8, n_fake=8)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    masm = cli_command(tmp_path)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    launcher += ["-m", "masm"] if masm[1] == "-m" else [masm[1]]
    overrides = tiny_overrides(
        data, epochs=1, **{"model.method.masm.mask.warmup": 1, "model.method.masm.mask.interval": 1}
    )
    argv = launcher + ["train", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    argv += [arg for item in overrides for arg in ("--set", item)]
    env = dict(os.environ, **{STATE_HASH_ENV: str(hashes), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (
        rank0["world_size"] == 2 and rank0["global_step"] == rank1["global_step"] == 4
    )  # 16 frames, global batch 4
    assert rank0["params"] == rank1["params"]
    assert rank0["mask"] == rank1["mask"] and rank0["mask"] is not None
    # what rank 0 saved is what both ranks hold
    from masm.models import create_detector
    from masm.training import load_train_config

    config = load_train_config(out / "config.yaml")
    detector = create_detector(
        config.model.backbone, config.model.method, preprocessing=config.model.preprocessing
    )
    detector.load_state_dict(load_file(str(out / "checkpoints/last/model.safetensors")), strict=False)
    assert parameter_hash(detector) == rank0["params"]
    masks = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    assert masks and masks[-1]["mask"] == rank0["mask"]

"""``make gpu-check``: does masm's GPU path work, and how fast is it? At most 9 minutes 20 s on one GPU.

Four checks, each recorded in a JSON report (written after every check, so a cut-short run still
leaves what it measured); the script exits 1 when any check fails or the budget is exceeded:

* ``precision``: a few training steps of MASM and Effort on ViT-L/14 shapes (``clip-vit-l14-random``),
  once in fp32 (TF32 off: the reference) and once under bf16 autocast (the CUDA default), from the same
  weights on the same batch; the losses of every step and the first step's gradients must agree within
  ``--loss-tol`` / ``--grad-tol``, and everything must stay finite.
* ``torchrun``: ``torchrun --nproc_per_node 1 -m masm train`` (a process group of one: DDP over NCCL on
  CUDA, gloo on CPU) on a tiny generated dataset, through the final evaluation on the test set.
* ``graph``: training with ``cuda_graph: true`` (the whole step captured as one CUDA graph and replayed)
  against eager training, tiny backbone, fp32, same data and seed, in one process and under ``torchrun``
  (DDP over NCCL, one process): the graph must have been replayed, and the trained weights and the logged
  losses must agree. On CPU the graph's body runs eagerly instead, in one process.
* ``speed``: ``masm bench speed --device DEVICE`` at ViT-B/16 and ViT-L/14 shapes, batch 32, bf16, eager,
  captured as a CUDA graph (``--cuda-graph``) and compiled (``--compile``): step time of MASM, full
  fine-tuning, Effort's reference and the frozen floor, their ratios and peak memory, and whether MASM
  meets issue 17's targets in each run (its step at most full fine-tuning's, 0.9 × Effort's reference and
  1.25 × the floor's).

``--device cpu`` runs the same checks on CPU with a tiny backbone (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
CHECKS = ("precision", "graph", "torchrun", "speed")
# per device: the backbone of the precision check, the speed benchmark's backbone, methods and batch
DEFAULTS = {
    "cuda": (
        "clip-vit-l14-random",
        "clip-vit-b16-random,clip-vit-l14-random",
        "masm,full,effort-reference,frozen-floor",
        32,
    ),
    "cpu": ("tiny-clip", "tiny-clip", "masm,frozen-floor", 2),
}
# the speed runs per device: eager, and the fast modes (captured, compiled; compiling is the slowest to
# set up, so it runs last); CPU's test-suite part stays eager
SPEED_MODES = {"cuda": ("eager", "cuda-graph", "compile"), "cpu": ("eager",)}
# issue 17: MASM's step against the others', in one run
STEP_TARGETS = {"masm_vs_full_step": 1.0, "masm_vs_effort_step": 0.9, "masm_vs_floor_step": 1.25}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--out", type=Path, help="report path (default: benchmarks/results/gpu_check_DEVICE.json)"
    )
    parser.add_argument(
        "--only", default=",".join(CHECKS), help=f"comma-separated checks of {', '.join(CHECKS)}"
    )
    parser.add_argument(
        "--backbone", help="precision check backbone (cuda: clip-vit-l14-random, cpu: tiny-clip)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="precision check batch")
    parser.add_argument("--steps", type=int, default=3, help="precision check steps per precision")
    parser.add_argument("--lr", type=float, default=1e-4, help="precision check Adam learning rate")
    parser.add_argument("--loss-tol", type=float, default=0.05, help="bf16 vs fp32: max |loss difference|")
    parser.add_argument(
        "--grad-tol", type=float, default=0.1, help="bf16 vs fp32: max ||g_bf16 - g_fp32|| / ||g_fp32||"
    )
    parser.add_argument(
        "--speed-backbone",
        help="speed benchmark backbones, comma-separated (cuda: clip-vit-b16-random,clip-vit-l14-random)",
    )
    parser.add_argument(
        "--speed-modes", help="speed runs: eager, cuda-graph and/or compile (cuda: all three, cpu: eager)"
    )
    parser.add_argument("--speed-batch-size", type=int, help="speed benchmark batch (cuda: 32)")
    parser.add_argument("--speed-methods", help="speed benchmark methods (cuda: all)")
    parser.add_argument("--speed-steps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=560.0, help="fail when the checks take longer")
    args = parser.parse_args(argv)
    backbone, speed_backbone, speed_methods, speed_batch = DEFAULTS[args.device]
    args.backbone = args.backbone or backbone
    args.speed_backbone = args.speed_backbone or speed_backbone
    args.speed_methods = args.speed_methods or speed_methods
    args.speed_batch_size = args.speed_batch_size or speed_batch
    args.speed_modes = args.speed_modes or ",".join(SPEED_MODES[args.device])
    args.out = args.out or REPO / "benchmarks" / "results" / f"gpu_check_{args.device}.json"
    unknown = sorted(set(args.only.split(",")) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    report: dict = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": _machine(),
        "checks": {},
    }
    if args.device == "cuda" and not _cuda_available():
        report["checks"]["cuda"] = {
            "ok": False,
            "error": "CUDA is not available: run on a GPU machine, or pass --device cpu for the CPU part",
        }
    else:
        with tempfile.TemporaryDirectory(prefix="masm-gpu-check-") as work:
            for name in args.only.split(","):
                remaining = args.budget_s - (time.monotonic() - started)
                report["checks"][name] = _run_check(name, args, Path(work), remaining)
                _write(report, args.out, started, args.budget_s)
    ok = _write(report, args.out, started, args.budget_s)
    for name, check in report["checks"].items():
        print(
            f"{name:10s} {'ok' if check['ok'] else 'FAILED'}  {check.get('seconds', 0):7.1f} s  {check.get('error', '')}"
        )
    print(
        f"{'ok' if ok else 'FAILED'} in {report['seconds']:.0f} s (budget {args.budget_s:.0f} s); report: {args.out}"
    )
    return 0 if ok else 1


def _run_check(name: str, args: argparse.Namespace, work: Path, remaining_s: float) -> dict:
    start = time.monotonic()
    if remaining_s <= 0:
        return {"ok": False, "error": "not run: the time budget was spent"}
    try:
        checks = {"precision": check_precision, "graph": check_graph, "torchrun": check_torchrun}
        result = {**checks, "speed": check_speed}[name](args, work, remaining_s)
    except Exception as err:
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-4000:],
        }
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def _write(report: dict, path: Path, started: float, budget_s: float) -> bool:
    report["seconds"] = round(time.monotonic() - started, 1)
    report["within_budget"] = report["seconds"] <= budget_s
    report["ok"] = bool(report["checks"]) and report["within_budget"]
    report["ok"] = report["ok"] and all(c["ok"] for c in report["checks"].values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report["ok"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine() -> dict:
    import platform

    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        info["nccl"] = (
            ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
        )
    return info


# -- bf16 against fp32 ----------------------------------------------------------------------------------
def check_precision(args: argparse.Namespace, work: Path, remaining_s: float) -> dict:
    """MASM and Effort: the same steps in fp32 and under bf16 autocast agree, and stay finite."""
    results = {method: _compare_precisions(method, args) for method in ("masm", "effort")}
    return {"ok": all(r["ok"] for r in results.values()), "backbone": args.backbone, "methods": results}


def _compare_precisions(method: str, args: argparse.Namespace) -> dict:
    import torch

    from masm.models import create_detector
    from masm.precision import configure_matmul_precision

    device = torch.device(args.device)
    torch.manual_seed(0)
    detector = create_detector(args.backbone, method, seed=0).to(device).train()
    params = detector.trainable_parameters()
    initial = [p.detach().clone() for p in params]
    size = detector.preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    y = (torch.arange(args.batch_size) % 2).to(device)
    runs = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        configure_matmul_precision(device, tf32=False)  # the reference is full fp32
        runs[precision] = _train_steps(detector, x, y, precision, args)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    loss_diff = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"]))
    reference = torch.cat([g.flatten() for g in fp32.pop("grads")])
    lowered = torch.cat([g.flatten() for g in bf16.pop("grads")])
    grad_rel = float((lowered - reference).norm() / reference.norm().clamp_min(1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(lowered, reference, dim=0))
    finite = all(math.isfinite(v) for run in runs.values() for v in run["losses"]) and math.isfinite(grad_rel)
    failures = []
    if not finite:
        failures.append("non-finite loss or gradient")
    if not loss_diff <= args.loss_tol:
        failures.append(f"loss differs by {loss_diff:.4g} > {args.loss_tol}")
    if not grad_rel <= args.grad_tol:
        failures.append(f"first-step gradients differ by {grad_rel:.4g} (relative) > {args.grad_tol}")
    if bf16["logits_dtype"] != "torch.bfloat16":
        failures.append(f"bf16 autocast produced {bf16['logits_dtype']} logits")
    return {
        "ok": not failures,
        **({"error": "; ".join(failures)} if failures else {}),
        "trainable": sum(p.numel() for p in params),
        "max_loss_diff": loss_diff,
        "grad_rel_err": grad_rel,
        "grad_cosine": cosine,
        "fp32": fp32,
        "bf16": bf16,
    }


def _train_steps(detector, x, y, precision: str, args: argparse.Namespace) -> dict:
    """What the trainer does per optimizer step: forward, loss, backward, mask, Adam, guard."""
    import torch

    from masm.method import SelectiveMaskController, layer_groups, subspace_update, total_loss
    from masm.precision import autocast_for
    from masm.training import make_optimizer

    masm_config = detector.config.method.masm_config
    params = detector.trainable_parameters()
    optimizer = make_optimizer(params, "adam", lr=args.lr)
    controller = None
    if masm_config is not None and masm_config.mask.enabled:
        controller = SelectiveMaskController(detector, masm_config.mask)
    groups = layer_groups(detector)
    losses, grads, times, logits_dtype = [], [], [], None
    for step in range(args.steps):
        _sync(x.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(x.device, precision):
            logits = detector(x)
        loss, _ = total_loss(logits, y, detector, masm_config, groups)
        loss.backward()
        if step == 0:
            logits_dtype = str(logits.dtype)
            grads = [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
                for p in params
            ]
        with subspace_update(detector, optimizer, controller, groups):
            optimizer.step()
        _sync(x.device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(x.device) / 2**20 if x.device.type == "cuda" else None
    return {
        "losses": losses,
        "grads": grads,
        "logits_dtype": logits_dtype,
        "step_ms": [round(t * 1000, 2) for t in times],
        "peak_mem_mb": peak,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- graph and torchrun -------------------------------------------------------------------------------------
def check_graph(args: argparse.Namespace, work: Path, remaining_s: float) -> dict:
    """Training with ``cuda_graph: true`` equals eager training (tiny backbone, fp32, 8 epochs), in one
    process and, on CUDA, under ``torchrun`` (DDP over NCCL, one process: the captured all-reduces). The
    replays are counted from the runs' logs (``graph_replays``)."""
    from masm.training import cuda_graph, load_train_config, train

    data = _tiny_dataset(work / "graph-data")  # 16 frames: 4 steps of 4 an epoch
    settings = {
        "device": args.device,
        "precision": "fp32",
        "tf32": "false",
        "epochs": 8,
        "data.train": f"folder:{data}",
        "data.val": "none",
        "model.method.masm.mask.interval": 8,  # recomputed (eagerly) at steps 3, 11, 19 and 27
    }
    original = cuda_graph.make_captured_step
    if args.device != "cuda":  # on CPU the graph's body runs eagerly, as in tests/test_cuda_graph.py
        cuda_graph.make_captured_step = lambda run: cuda_graph.CapturedStep(run, capture=False)
    try:
        runs = {}
        for mode in ("eager", "graph"):
            extra = {"cuda_graph": "true"} if mode == "graph" else {}
            overrides = [f"{k}={v}" for k, v in {**settings, **extra}.items()]
            train(load_train_config(TINY_CONFIG, overrides), work / f"graph-{mode}", progress=False)
            runs[mode] = _trained(work / f"graph-{mode}")
    finally:
        cuda_graph.make_captured_step = original
    result: dict = {}
    failures = []
    replays = {"graph": runs["graph"].pop("replays")}
    # DDP's captured step needs CUDA (its rank vote is tested on CPU: tests/test_cuda_graph_ddp.py)
    if args.device == "cuda":
        overrides = {**settings, "cuda_graph": "true"}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        command += ["-m", "masm", "train", str(TINY_CONFIG), "--out", str(work / "graph-ddp")]
        command += ["--no-progress"]
        command += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, remaining_s / 2))
        result["graph-ddp"] = {"command": " ".join(command), "returncode": proc.returncode}
        result["graph-ddp"].update(_keep_log(proc, args.out, "graph_ddp"))
        if proc.returncode != 0:
            failures.append(f"cuda_graph under torchrun: exit status {proc.returncode}")
        else:
            runs["graph-ddp"] = _trained(work / "graph-ddp")
            replays["graph-ddp"] = runs["graph-ddp"].pop("replays")
    eager = runs.pop("eager")
    result["replays"] = replays
    for mode, graph in runs.items():
        weight_err = max(
            (graph["weights"][k].float() - w.float()).abs().max().item() for k, w in eager["weights"].items()
        )
        loss_err = max((abs(a - b) for a, b in zip(eager["losses"], graph["losses"])), default=math.inf)
        result[mode] = {
            **result.get(mode, {}),
            "max_weight_diff": weight_err,
            "max_loss_diff": loss_err,
            "steps": len(graph["losses"]),
        }
        if args.device == "cuda" and replays[mode] < 8:
            failures.append(f"{mode}: the graph was replayed {replays[mode]} times, expected at least 8")
        if len(graph["losses"]) != len(eager["losses"]) or not weight_err <= 1e-4 or not loss_err <= 1e-4:
            failures.append(
                f"{mode} and eager training differ: weights {weight_err:.2e}, losses {loss_err:.2e}"
            )
    if failures:
        result["error"] = "; ".join(failures)
    result["ok"] = not failures
    return result


def _trained(folder: Path) -> dict:
    """A finished run's last weights, its logged losses and how many steps were graph replays."""
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["kind"] == "train"]
    return {
        "weights": load_file(folder / "checkpoints" / "last" / "model.safetensors"),
        "losses": [r["total"] for r in trained],
        "replays": trained[-1].get("graph_replays", 0) if trained else 0,
    }


def check_torchrun(args: argparse.Namespace, work: Path, remaining_s: float) -> dict:
    """``torchrun --nproc_per_node 1 -m masm train`` through the final test evaluation."""
    data = _tiny_dataset(work / "data")
    out = work / "run"
    settings = {
        "device": args.device,
        "epochs": 1,
        "data.train": f"folder:{data}",
        "data.val": f"folder:{data}",
        "data.test": f"[folder:{data}]",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += ["-m", "masm", "train", str(TINY_CONFIG), "--out", str(out), "--no-progress"]
    command += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = dict(os.environ, NCCL_DEBUG="INFO", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(1.0, remaining_s))
    result: dict = {"command": " ".join(command), "returncode": proc.returncode}
    result.update(_keep_log(proc, args.out, "torchrun"))
    failures = []
    if proc.returncode != 0:
        failures.append(f"exit status {proc.returncode}")
    report_path = out / "eval" / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        result["test_frame_auc"] = report["mean"]["frame"]["auc"]
        result["processes"] = report["meta"].get("processes")
        if result["processes"] != 1:
            failures.append(f"the evaluation report says {result['processes']} processes, expected 1")
    else:
        failures.append(f"no test report at {report_path}")
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    result["train_steps"] = sum(r["kind"] == "train" for r in records)
    if not result["train_steps"] or not any(r["kind"] == "eval" for r in records):
        failures.append("metrics.jsonl lacks training or validation records")
    if args.device == "cuda":
        result["nccl"] = "NCCL INFO" in proc.stdout + proc.stderr
        if not result["nccl"]:
            failures.append("NCCL was not used (no NCCL INFO output)")
    if failures:
        result["error"] = "; ".join(failures)
    result["ok"] = not failures
    return result


def _keep_log(proc: subprocess.CompletedProcess, report: Path, name: str) -> dict:
    """A subprocess's whole output beside the report, and its error lines (not the C++ frames) in it."""
    log = report.with_name(f"{report.stem}_{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ stdout\n{proc.stdout}\n$ stderr\n{proc.stderr}")
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    errors = [line for line in lines if ("Error" in line or "error:" in line) and "frame #" not in line]
    return {"log": str(log), "error_lines": errors[:20], "stderr_tail": proc.stderr[-1500:]}


def _tiny_dataset(root: Path, per_class: int = 8) -> Path:
    """``root/real/*.png`` and ``root/fake/<family>/*.png``: random 32-px images, fakes with a bright band."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("real", "fake/band_a", "fake/band_b"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class if folder == "real" else per_class // 2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            if folder != "real":
                pixels[:8] = 255
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- speed ------------------------------------------------------------------------------------------------
def check_speed(args: argparse.Namespace, work: Path, remaining_s: float) -> dict:
    """``masm bench speed --device DEVICE`` for every backbone and mode: finite times, ratios, memory."""
    started = time.time()
    runs = {}
    for mode in args.speed_modes.split(","):  # mode by mode: a run cut short by the budget loses the last
        for backbone in args.speed_backbone.split(","):
            left = remaining_s - (time.time() - started)
            runs[f"{backbone}/{mode}"] = _speed_run(args, work, backbone, mode, left)
    return {"runs": runs, "ok": all(run["ok"] for run in runs.values())}


def _speed_run(args: argparse.Namespace, work: Path, backbone: str, mode: str, remaining_s: float) -> dict:
    from masm.benchmarks.speed import TRAIN_METHODS

    methods = ",".join(TRAIN_METHODS) if args.speed_methods == "all" else args.speed_methods
    out = work / f"speed-{backbone}-{mode}.json"
    command = [sys.executable, "-m", "masm", "bench", "speed", "--device", args.device]
    command += ["--backbone", backbone, "--methods", methods, "--out", str(out)]
    command += ["--steps", str(args.speed_steps), "--batch-size", str(args.speed_batch_size)]
    command += ["--warmup", "0"] if args.device == "cpu" else []
    command += {"compile": ["--compile"], "cuda-graph": ["--cuda-graph"]}.get(mode, [])
    proc = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, remaining_s))
    result: dict = {"command": " ".join(command), "returncode": proc.returncode}
    result.update(_keep_log(proc, args.out, f"speed-{backbone}-{mode}"))
    if proc.returncode != 0 or not out.is_file():
        return {**result, "ok": False, "error": f"exit status {proc.returncode}"}
    speed = json.loads(out.read_text())
    train = speed["train"]
    result["step_ms"] = {m: round(r["step_s"] * 1000, 3) for m, r in train.items()}
    result["peak_mem_mb"] = {m: r["peak_mem_mb"] for m, r in train.items()}
    result["ratios"] = speed["ratios"]
    result["targets_met"] = speed["targets_met"]
    result["issue17_targets_met"] = {
        key: speed["ratios"][key] <= limit for key, limit in STEP_TARGETS.items() if key in speed["ratios"]
    }
    result["table"] = proc.stdout
    values = [*result["step_ms"].values(), *result["peak_mem_mb"].values()]
    values += [v for k, v in result["ratios"].items() if k != "masm_syncs_per_step"]
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad or set(train) != set(methods.split(",")):
        result["error"] = (
            f"missing or non-positive measurements: {bad or sorted(set(methods.split(',')) - set(train))}"
        )
    result["ok"] = "error" not in result
    return result


if __name__ == "__main__":
    sys.exit(main())

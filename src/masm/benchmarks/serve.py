"""``masm bench serve``: ``masm serve`` over loopback, concurrent clients against one client at a time.

A real ``masm serve`` process is started on 127.0.0.1 (a free port) with the model; each client is a thread
with its own keep-alive HTTP connection posting images to ``/v1/detect`` one after another. One round
sends the same requests twice: by one client at a time, then by ``--clients`` concurrent clients. The
report gives p50/p99 latency and throughput of both, per round and as medians over the rounds, and the
ratio of concurrent to one-at-a-time throughput (the median of the per-round ratios): what batching the
requests that arrive together buys. Every answer must be a 200 with a score; any other is counted as an
error.

Without ``--model`` the quick demo's detector is used as ``masm demo --quick`` builds it (the demo backbone,
MASM, 64 px whole images) with untrained adapters: speed does not depend on what the weights learned.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from masm.errors import MasmError

from .common import add_common_arguments, write_result

# A server that is not answering /health by then did not start.
START_TIMEOUT_S = 120


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory (default: the quick demo's detector, untrained)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=96, help="requests per mode and round (default: 96)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default: 3)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the PNGs sent (default: 128)")
    parser.add_argument(
        "--serve-args", default="", help="extra arguments for masm serve, e.g. '--batch-window-ms 5'"
    )
    add_common_arguments(parser, "serve")


def run(args) -> int:
    if args.clients < 1 or args.requests < 1 or args.rounds < 1 or args.image_size < 16:
        raise MasmError("--clients, --requests and --rounds must be >= 1, --image-size >= 16")
    with tempfile.TemporaryDirectory(prefix="masm-bench-serve-") as tmp:
        model = Path(args.model) if args.model else quick_demo_detector(Path(tmp) / "model")
        bodies = [multipart_body(png) for png in random_pngs(16, args.image_size)]
        with running_server(model, args.serve_args.split()) as url:
            result = measure(url, bodies, args.clients, args.requests, args.rounds)
            result["server"] = get_json(url, "/health")
    result.update(
        model=str(args.model) if args.model else "quick demo detector (demo-clip, masm, 64 px, untrained)",
        image_size=args.image_size,
        serve_args=args.serve_args,
        cpus=os.cpu_count(),
    )
    write_result(args.out, result, format_table(result))
    return 1 if result["errors"] else 0


# -- the service --------------------------------------------------------------------------------------------


def quick_demo_detector(directory: Path) -> Path:
    """The quick demo's detector architecture (what ``masm demo --quick`` leaves at OUT/model), untrained."""
    from masm.demo.run import ensure_demo_backbone
    from masm.models import Preprocessing, create_detector, save_checkpoint

    ensure_demo_backbone(progress=False)
    detector = create_detector(
        "demo-clip", "masm", preprocessing=Preprocessing(input_size=64, face_crop=None)
    )
    return save_checkpoint(detector, directory)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, extra: list[str] = (), log_path: Path | None = None):
    """``masm serve MODEL`` on 127.0.0.1 and a free port, until the block ends; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "masm", "serve", str(model), "--port", str(port), "--log-level", "warning"]
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")  # closed in the finally
    proc = subprocess.Popen([*argv, *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise MasmError(f"masm serve exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                get_json(url, "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise MasmError(f"masm serve did not answer within {START_TIMEOUT_S} s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def get_json(url: str, path: str, headers: dict | None = None) -> dict:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


# -- the clients --------------------------------------------------------------------------------------------


def random_pngs(count: int, size: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def multipart_body(data: bytes, filename: str = "image.png") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``data`` as the ``file`` field, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load(url: str, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    """``requests`` posts to ``/v1/detect`` spread over ``clients`` concurrent clients: latencies, rate."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body, content_type = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    conn.request("POST", "/v1/detect", body=body, headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    answer = response.read()
                    ok = response.status == 200 and json.loads(answer).get("score") is not None
                except OSError as err:
                    ok, answer = False, str(err).encode()
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=60)
                elapsed = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors.append(answer[:200].decode("utf-8", "replace"))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": requests,
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def measure(url: str, bodies, clients: int, requests: int, rounds: int) -> dict:
    load(url, bodies, clients, min(requests, 2 * clients))  # warm-up: first batches, thread pools, caches
    runs = []
    for _ in range(rounds):  # the two modes interleaved, so both see the same machine state
        single = load(url, bodies, 1, requests)
        concurrent = load(url, bodies, clients, requests)
        runs.append({"single": single, "concurrent": concurrent})

    def median(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in runs)

    summary = {
        mode: {key: median(mode, key) for key in ("requests_per_s", "p50_ms", "p99_ms")}
        for mode in ("single", "concurrent")
    }
    ratios = [r["concurrent"]["requests_per_s"] / r["single"]["requests_per_s"] for r in runs]
    return {
        "clients": clients,
        "requests": requests,
        "rounds": rounds,
        "errors": sum(r[m]["errors"] for r in runs for m in ("single", "concurrent")),
        "single": summary["single"],
        "concurrent": summary["concurrent"],
        "throughput_ratio": statistics.median(ratios),
        "ratios": ratios,
        "runs": runs,
    }


def format_table(result: dict) -> str:
    """The summary ``masm bench serve`` prints: requests/s and latencies of both modes, their ratio."""
    head = (
        f"masm serve over loopback: {result['model']}, {result['image_size']} px PNGs, "
        f"{result['requests']} requests per mode, median of {result['rounds']} rounds, {result['cpus']} CPUs"
    )
    lines = [head, f"  {'mode':<28} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8}"]
    for name, mode in (
        ("1 client at a time", "single"),
        (f"{result['clients']} concurrent clients", "concurrent"),
    ):
        r = result[mode]
        lines.append(f"  {name:<28} {r['requests_per_s']:10.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    lines.append(
        f"  {'throughput ratio':<28} {result['throughput_ratio']:10.2f}  (concurrent / one at a time)"
    )
    server = result.get("server", {})
    lines.append(
        f"  errors: {result['errors']}; batches: {server.get('batches')}, "
        f"mean batch {server.get('mean_batch', 0):.1f} crops, largest {server.get('largest_batch')}"
    )
    return "\n".join(lines)

"""``masm bench detect``: throughput of the whole detect path against the plain backbone's forward pass.

The detect path (:class:`masm.inference.Scorer` with ``--no-face``: read PNG face crops from disk, resize,
normalise, batch, run the merged MASM detector) is timed on pre-cropped images and compared with a plain
``CLIPVisionModel`` forward on an already prepared batch of the same size, in the same run. The median of
repeated runs is reported; ratio = detect / plain images per second (1.0: inference costs nothing beyond
the backbone; below 1 the gap is decoding and preprocessing, since the merged model is plain Linears).
``--explain`` also times the path with explanation maps (``masm detect --explain``: one backward per batch
and a PNG overlay per image), interleaved with the others.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from .common import add_common_arguments, write_result


def add_arguments(parser) -> None:
    parser.add_argument("--backbone", default="clip-vit-b16-random", help="backbone registry name")
    parser.add_argument("--method", default="masm", help="fine-tuning method of the detector")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--images", type=int, default=8, help="pre-cropped images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--explain", action="store_true", help="also time detect --explain (maps and PNGs)")
    add_common_arguments(parser, "detect")


def run(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from masm.errors import MasmError
    from masm.inference import Scorer, ScorerOptions
    from masm.models import create_detector, load_backbone

    if args.batch_size < 1 or args.images < 1 or args.repeats < 1:
        raise MasmError("--batch-size, --images and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    detector = create_detector(args.backbone, args.method)
    size = detector.preprocessing.input_size
    scorer = Scorer(detector, ScorerOptions(batch_size=args.batch_size, faces=False), device=device)
    plain = load_backbone(args.backbone).to(device).eval()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="masm-bench-detect-") as tmp:
        explaining = None
        if args.explain:
            options = ScorerOptions(
                batch_size=args.batch_size, faces=False, explain_dir=str(Path(tmp) / "maps")
            )
            explaining = Scorer(scorer.model, options, device=device)
        paths = []
        for i in range(args.images):
            paths.append(str(Path(tmp) / f"{i:04d}.png"))
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
        batch = torch.randn(args.batch_size, 3, size, size, device=device)

        def detect_once(scorer=scorer) -> float:
            start = time.perf_counter()
            results = list(scorer.score_paths(paths))
            elapsed = time.perf_counter() - start
            if any(r["error"] for r in results):
                raise MasmError(f"detect failed on a benchmark image: {results[0]['error']}")
            return len(results) / elapsed

        @torch.no_grad()
        def plain_once() -> float:
            batches = -(-args.images // args.batch_size)
            start = time.perf_counter()
            for _ in range(batches):
                plain(pixel_values=batch).pooler_output.sum().item()
            return batches * args.batch_size / (time.perf_counter() - start)

        detect_once(), plain_once()  # warm-up
        if explaining is not None:
            detect_once(explaining)
        detect_ips, plain_ips, explain_ips = [], [], []
        for _ in range(args.repeats):  # interleaved so all see the same machine state
            detect_ips.append(detect_once())
            plain_ips.append(plain_once())
            if explaining is not None:
                explain_ips.append(detect_once(explaining))

    result = {
        "backbone": args.backbone,
        "method": args.method,
        "merged": scorer.model.merged,
        "input_size": size,
        "batch_size": args.batch_size,
        "images": args.images,
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "detect_images_per_s": statistics.median(detect_ips),
        "plain_forward_images_per_s": statistics.median(plain_ips),
        "detect_runs": detect_ips,
        "plain_runs": plain_ips,
    }
    result["ratio"] = result["detect_images_per_s"] / result["plain_forward_images_per_s"]
    if explain_ips:
        result["explain_images_per_s"] = statistics.median(explain_ips)
        result["explain_runs"] = explain_ips
        result["explain_ratio"] = result["explain_images_per_s"] / result["plain_forward_images_per_s"]
    write_result(args.out, result, format_table(result))
    return 0


def format_table(result: dict) -> str:
    """The summary ``masm bench detect`` prints: images/s of each path and their ratios to the plain one."""
    head = (
        f"{result['backbone']} ({result['method']}, merged={result['merged']}), {result['input_size']} px, "
        f"batch {result['batch_size']}, {result['images']} images, median of {result['repeats']}, "
        f"{result['device']} x{result['threads']} threads"
    )
    rows = [
        ("detect path (PNG -> score, --no-face)", result["detect_images_per_s"]),
        ("plain backbone forward (tensor batch)", result["plain_forward_images_per_s"]),
    ]
    lines = [head] + [f"  {name:<40} {ips:8.2f} images/s" for name, ips in rows]
    lines.append(f"  {'ratio detect / plain':<40} {result['ratio']:8.3f}")
    if "explain_images_per_s" in result:
        lines.append(
            f"  {'detect --explain (maps, PNG overlays)':<40} {result['explain_images_per_s']:8.2f} images/s"
        )
        lines.append(f"  {'ratio detect --explain / plain':<40} {result['explain_ratio']:8.3f}")
    return "\n".join(lines)

"""``masm bench data``: frames per second of one DataLoader worker, and how many workers a GPU needs.

Times the training loader's own per-sample work (:class:`masm.training.data.TrainFrames` under
:func:`masm.data.dataset.collate_frames`, as :func:`masm.training.data.build_train_loader` builds it) for
two kinds of data:

* ``crops``: DeepfakeBench-style PNG face crops with the training augmentation: decode the PNG, augment
  (albumentations, :class:`masm.data.transforms.AugmentConfig` defaults), resize to the model input,
  normalise, collate;
* ``pseudo-fakes``: the real crops made into self-blended pseudo-fakes on the fly, with the settings of
  ``configs/sbi/clip-vit-l14-masm.yaml`` (:data:`SBI_PSEUDO_FAKES`): decode, resize to the input, dlib's 68
  landmarks and the blend for half of them, then the same augmentation, normalisation and collation.

One worker is one process, so the rate of one worker is measured in this process with ``num_workers=0``
and ``--threads`` OpenCV and torch threads (1: one core, what each worker gets when all are busy), as the
median of ``--repeats`` passes over ``--frames`` frames after a warm-up batch. ``--workers 1,2`` also runs
the real DataLoader with that many worker processes (persistent, after a warm-up pass) to show how the rate
scales with the cores there are. From the rate of one worker ``r`` (frames/s), a training step of ``t``
seconds on a batch of ``B`` frames needs ``ceil(B / (t * r))`` workers to never wait for data.

Without ``--data`` the benchmark writes its own data set (:mod:`masm.benchmarks.loader_data`): ``--size``
px aligned face crops of scikit-image's astronaut photo (cut as ``masm preprocess`` cuts faces, each frame
with a small random shift, rotation and scale), half of them forged with the ``blend`` family, saved as PNG
like ``masm preprocess`` saves them and listed in a DeepfakeBench JSON index. The files are then in the
page cache: disk reads are not timed.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from .common import add_common_arguments, write_result
from .loader_data import make_dataset, open_records

KINDS = ("crops", "pseudo-fakes")
# configs/sbi/clip-vit-l14-masm.yaml's data.pseudo_fakes (a test keeps the two equal)
SBI_PSEUDO_FAKES = {
    "probability": 0.5,
    "families": ["blend"],
    "strength": 1.0,
    "region": "face",
    "real_only": True,
}
# ViT-B/16, batch 32, bf16 on one H100 (docs/benchmarks.md, "Speed on the GPU"): MASM's step and the
# frozen floor's (the least any adapter of those layers costs)
DEFAULT_STEP_MS = "57.2,24.0"
DEFAULT_BATCH = 32


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        help="a DeepfakeBench JSON index (PATH.json, its train split; PATH.json@split for another) or a "
        "data spec (dfb:, folder:, frames:) to time instead of the generated crops (default: none, "
        "generate them)",
    )
    parser.add_argument("--data-root", help="root of the index's frame paths (default: the JSON's folder)")
    parser.add_argument("--size", type=int, default=256, help="side of the generated PNG face crops in px")
    parser.add_argument(
        "--input-size", type=int, default=224, help="model input side the crops are resized to (CLIP's)"
    )
    parser.add_argument("--frames", type=int, default=64, help="frames per timed pass, for each kind")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (the median is reported)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated kinds of data, from: {', '.join(KINDS)}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OpenCV and torch threads of a worker (1: one core, what each worker gets when all are busy)",
    )
    parser.add_argument(
        "--workers",
        default="",
        help="comma-separated numbers of DataLoader worker processes to also time the real loader with",
    )
    parser.add_argument("--loader-batch", type=int, default=8, help="frames per batch the loader makes")
    parser.add_argument(
        "--step-ms",
        default=DEFAULT_STEP_MS,
        help="training step times in ms to size the loader for, comma-separated (57.2 and 24.0: MASM's and "
        "the frozen floor's ViT-B/16 batch-32 bf16 steps on one H100, docs/benchmarks.md)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, help="frames per training step on one GPU"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of the passes")
    add_common_arguments(parser, "data")


# -- the workers a GPU needs -------------------------------------------------------------------------------
def workers_needed(batch_size: int, step_ms: float, frames_per_s_per_worker: float) -> int:
    """Workers that prepare ``batch_size`` frames within one ``step_ms`` step: ``ceil(B / (t * r))``, >= 1."""
    if frames_per_s_per_worker <= 0 or step_ms <= 0:
        raise ValueError("step time and frames per second must be positive")
    exact = batch_size / (step_ms / 1000.0 * frames_per_s_per_worker)
    return max(1, math.ceil(exact - 1e-9))  # 8.000000000000002 from float rounding is 8 workers


# -- timing ------------------------------------------------------------------------------------------------
def _set_threads(threads: int) -> tuple[int, int]:
    import cv2
    import torch

    before = (torch.get_num_threads(), cv2.getNumThreads())
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return before


def _worker_init(threads: int, worker_id: int) -> None:
    from masm.training.state import worker_init_fn

    worker_init_fn(worker_id)  # the training loader's own
    _set_threads(threads)


def _consume(loader, limit: int | None = None) -> tuple[int, int, int]:
    """(frames prepared, frames labelled fake, failed samples) of a pass, or of its first ``limit`` batches."""
    good = fakes = failed = 0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        good += len(batch["label"])
        fakes += int(batch["label"].sum())
        failed += len(batch["failed"])
    return good, fakes, failed


def _timed_passes(frames, loader, repeats: int) -> tuple[list[float], int, int, int]:
    """Frames/s of each of ``repeats`` passes, and over all passes: frames prepared, labelled fake, failed."""
    rates, good, fakes, failed = [], 0, 0, 0
    for epoch in range(1, repeats + 1):
        frames.set_epoch(epoch)  # new augmentation and pseudo-fake draws each pass (0 is the warm-up's)
        start = time.perf_counter()
        counts = _consume(loader)
        rates.append(counts[0] / (time.perf_counter() - start))
        good, fakes, failed = good + counts[0], fakes + counts[1], failed + counts[2]
    return rates, good, fakes, failed


def time_kind(kind: str, records, args) -> dict:
    """Frames/s of one worker (in process) and, for ``args.workers``, of the real multi-worker loader."""
    import torch
    from torch.utils.data import DataLoader

    from masm.data.dataset import collate_frames
    from masm.data.pseudo_fakes import PseudoFakeConfig
    from masm.data.transforms import build_transform
    from masm.errors import MasmError
    from masm.models.preprocessing import Preprocessing
    from masm.training.data import TrainFrames

    preprocessing = Preprocessing(input_size=args.input_size)
    transform = build_transform(preprocessing, train=True, seed=args.seed)
    pseudo = PseudoFakeConfig(**SBI_PSEUDO_FAKES) if kind == "pseudo-fakes" else None
    frames = TrainFrames(records, transform, args.seed, pseudo_fakes=pseudo)
    result: dict = {"frames": len(records)}
    before = _set_threads(args.threads)
    try:
        loader = DataLoader(frames, batch_size=args.loader_batch, num_workers=0, collate_fn=collate_frames)
        frames.set_epoch(0)
        _consume(loader, limit=1)  # warm-up: imports, dlib's models
        rates, good, fakes, failed = _timed_passes(frames, loader, args.repeats)
    finally:
        torch.set_num_threads(before[0])
        import cv2

        cv2.setNumThreads(before[1])
    if not good:
        raise MasmError(f"bench data: every {kind} frame failed to load or forge (first: {records[0].path})")
    rate = statistics.median(rates)
    result.update(
        frames_per_s_per_worker=rate,
        ms_per_frame=1000.0 / rate,
        runs=rates,
        failed=failed,
        fake_share=fakes / good,
        workers={},
    )
    for workers in args.worker_counts:
        loader = DataLoader(
            frames,
            batch_size=args.loader_batch,
            num_workers=workers,
            collate_fn=collate_frames,
            worker_init_fn=functools.partial(_worker_init, args.threads),
            persistent_workers=True,
        )
        frames.set_epoch(0)
        _consume(loader)  # warm-up pass: starts the workers
        rates = _timed_passes(frames, loader, args.repeats)[0]
        del loader  # ends the persistent workers
        rate = statistics.median(rates)
        result["workers"][str(workers)] = {
            "frames_per_s": rate,
            "frames_per_s_per_worker": rate / workers,
            "runs": rates,
        }
    return result


def _int_list(text: str, flag: str) -> list[int]:
    from masm.errors import MasmError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MasmError(f"{flag} {text!r}: expected comma-separated whole numbers") from None
    if any(v < 1 for v in values):
        raise MasmError(f"{flag} {text!r}: every number must be >= 1")
    return values


def _step_list(text: str) -> list[float]:
    from masm.errors import MasmError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MasmError(f"--step-ms {text!r}: expected comma-separated milliseconds") from None
    if not values or any(not v > 0 for v in values):
        raise MasmError(f"--step-ms {text!r}: expected positive milliseconds")
    return values


def run(args) -> int:
    import numpy as np

    from masm.errors import MasmError

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise MasmError(f"--kinds {args.kinds!r}: known kinds are {', '.join(KINDS)}")
    if min(args.frames, args.repeats, args.loader_batch, args.batch_size, args.threads) < 1:
        raise MasmError("--frames, --repeats, --loader-batch, --batch-size and --threads must be >= 1")
    if args.size < 16 or args.input_size < 16:
        raise MasmError("--size and --input-size must be >= 16 px")
    args.worker_counts = _int_list(args.workers, "--workers")
    steps = _step_list(args.step_ms)

    with tempfile.TemporaryDirectory(prefix="masm-bench-data-") as tmp:
        if args.data:
            records, source = open_records(args.data, args.data_root)
        else:
            index = make_dataset(Path(tmp), args.frames, args.frames, args.size, args.seed)
            records, source = open_records(str(index), None)
        rng = np.random.default_rng(args.seed)
        chosen = {
            "crops": [records[i] for i in sorted(rng.permutation(len(records))[: args.frames])],
            "pseudo-fakes": [r for r in records if r.label == 0][: args.frames],
        }
        if "pseudo-fakes" in kinds and not chosen["pseudo-fakes"]:
            raise MasmError(f"{source}: no real frames to make pseudo-fakes from (use --kinds crops)")
        used = {r.path for k in kinds for r in chosen[k]}
        png_bytes = statistics.mean(os.path.getsize(p) for p in used)
        results = {kind: time_kind(kind, chosen[kind], args) for kind in kinds}

    result = {
        "data": args.data
        or f"generated: {args.size} px PNG face crops, {args.frames} real + {args.frames} fake",
        "spec": source if args.data else None,
        "crop_size": None if args.data else args.size,
        "input_size": args.input_size,
        "mean_file_bytes": png_bytes,
        "frames": args.frames,
        "repeats": args.repeats,
        "threads": args.threads,
        "loader_batch": args.loader_batch,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "pseudo_fakes": SBI_PSEUDO_FAKES,
        "kinds": results,
        "batch_size": args.batch_size,
        "step_ms": steps,
        "workers_needed": [
            {"step_ms": step}
            | {
                kind: workers_needed(args.batch_size, step, r["frames_per_s_per_worker"])
                for kind, r in results.items()
            }
            for step in steps
        ],
    }
    write_result(args.out, result, format_table(result))
    return 0


def format_table(result: dict) -> str:
    """The summary ``masm bench data`` prints: frames/s per kind and worker count, workers needed per GPU."""
    size = f"{result['crop_size']} px PNG crops" if result["crop_size"] else result["data"]
    lines = [
        f"training loader per sample: {size} -> {result['input_size']} px input, mean file "
        f"{result['mean_file_bytes'] / 1024:.0f} KiB, {result['frames']} frames per pass, median of "
        f"{result['repeats']}, {result['threads']} thread(s) per worker, {result['machine']}, "
        f"{result['cpus']} CPUs",
        f"  {'kind':<14} {'workers':>16} {'frames/s':>9} {'per worker':>11} {'ms/frame':>9}",
    ]
    for kind, r in result["kinds"].items():
        rate = r["frames_per_s_per_worker"]
        lines.append(f"  {kind:<14} {'1 (in process)':>16} {rate:9.1f} {rate:11.1f} {1000 / rate:9.1f}")
        for workers, w in r["workers"].items():
            lines.append(
                f"  {kind:<14} {workers:>16} {w['frames_per_s']:9.1f} {w['frames_per_s_per_worker']:11.1f} "
                f"{1000 / w['frames_per_s_per_worker']:9.1f}"
            )
    if "pseudo-fakes" in result["kinds"]:
        r = result["kinds"]["pseudo-fakes"]
        lines.append(
            f"  pseudo-fakes made of {r['fake_share']:.0%} of the real frames (a face found, p = 0.5)"
        )
    failed = {k: r["failed"] for k, r in result["kinds"].items() if r["failed"]}
    if failed:
        lines.append(f"  failed samples: {failed}")
    kinds = list(result["kinds"])
    lines.append(
        f"workers needed per GPU = ceil(batch / (step s x frames/s of one worker)), batch {result['batch_size']}:"
    )
    lines.append(f"  {'step ms':>8} " + " ".join(f"{k:>14}" for k in kinds))
    for row in result["workers_needed"]:
        lines.append(f"  {row['step_ms']:8.1f} " + " ".join(f"{row[k]:>14d}" for k in kinds))
    return "\n".join(lines)

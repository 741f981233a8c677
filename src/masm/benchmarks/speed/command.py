"""The command line of ``masm bench speed``: its options, and a run from them to the written result."""

from __future__ import annotations

from ..common import add_common_arguments, write_result
from .harness import run_speed_benchmark
from .methods import TRAIN_METHODS, SpeedSettings
from .report import format_results


def add_arguments(parser) -> None:
    parser.add_argument(
        "--backbone",
        default="clip-vit-b16-random",
        help="backbone of any supported family: registry name (e.g. tiny-dinov2), hub id or directory "
        "(default: CLIP ViT-B/16 shapes)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--methods", default=",".join(TRAIN_METHODS), help="comma-separated training methods")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="as in training: auto is bf16 autocast on CUDA and fp32 on CPU",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile each method's model with torch.compile, as training's compile: true (ops and syncs "
        "are then not counted: a compiled step runs generated kernels, not dispatched operations)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA only: time each method's whole step captured as one CUDA graph, as training's "
        "cuda_graph: true (memory, ops and syncs are still those of the eager step)",
    )
    parser.add_argument(
        "--measure",
        choices=("all", "memory"),
        default="all",
        help="memory: only training memory, ops and syncs (no step timing, no inference; for big backbones)",
    )
    add_common_arguments(parser, "speed")


def run(args) -> int:
    from masm.errors import MasmError

    settings = SpeedSettings(
        args.backbone,
        args.batch_size,
        args.steps,
        args.warmup,
        args.device,
        args.threads,
        args.precision,
        args.compile,
        args.cuda_graph,
    )
    if settings.cuda_graph and not str(settings.device).startswith("cuda"):
        raise MasmError(f"--cuda-graph needs a CUDA device, not {settings.device!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(TRAIN_METHODS))
    if unknown:
        raise MasmError(
            f"unknown method {unknown[0]!r} for the speed benchmark; choose from {', '.join(TRAIN_METHODS)}"
        )
    results = run_speed_benchmark(settings, methods, memory_only=args.measure == "memory")
    write_result(args.out, results, format_results(results))
    return 0

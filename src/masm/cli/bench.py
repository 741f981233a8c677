"""``masm bench NAME``: benchmarks. Each lives in ``masm.benchmarks.<module>`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; all share one shape (:mod:`masm.benchmarks.common`):
``--out FILE.json`` with any figures beside it, ``--work DIR`` for the runs a benchmark reuses, and
``--no-progress``."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "speed": ("speed", "training-step and inference speed and peak memory: MASM vs Effort, LoRA, full"),
    "quality": ("quality", "leave-family-out generalisation of every method on synthetic forgeries"),
    "preprocess": ("preprocess_speed", "face preprocessing throughput on a 720p clip"),
    "data": ("data_speed", "training-loader frames/s of one worker (crops, pseudo-fakes); workers per GPU"),
    "detect": ("detect_speed", "detect throughput (files -> scores) vs a plain backbone forward"),
    "serve": ("serve", "masm serve over loopback: concurrent clients vs one at a time (batching)"),
    "explain": ("explain_maps", "explanation maps vs the true forgery region: pixel AUC and pointing game"),
    "aigi": ("aigi", "cross-generator generalisation: train on one autoencoder's fakes, test on all of them"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark",
        description="Run one of the benchmarks below; masm bench NAME --help lists its options.",
    )
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"masm.benchmarks.{module_name}")
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(func=module.run)

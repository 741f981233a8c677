"""The report of ``masm bench speed``: the ratios between methods, their targets, and the printed tables.

A step-time ratio is the median over rounds of the ratio of the two methods' steps in that round
(:func:`speed_ratios`), so that the machine's drift and bursts of load do not enter it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

from ..common import machine_info
from .methods import SpeedSettings

# The most each ratio may be (ratios <= target are met); a ratio not measured in a run is left out.
TARGETS = {
    "masm_vs_floor_ops": 1.35,
    "masm_syncs_per_step": 0,
    "masm_vs_floor_step": 1.05,
    "masm_vs_effort_step": 0.9,
    "masm_vs_full_step": 0.75,
    "merged_vs_plain_infer": 1.02,
    "masm_vs_full_peak_mem": 1.0,
}


def speed_ratios(train: dict, times: dict[str, list[float]], infer: dict) -> dict:
    """The ratios between the methods in ``train``, from their per-round step ``times``, memory and counts,
    and the merged detector's inference time against the plain backbone's."""

    def step_ratio(a: str, b: str) -> float:
        # Median over rounds of the ratio of the two steps taken in the same round: the machine's drift and
        # bursts of load (±20 % from step to step on a shared 2-core machine) hit both alike.
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {}
    if "masm" in train:
        masm = train["masm"]
        for other in ("effort-reference", "full", "lora", "effort"):
            if other in train:
                # "effort" here is Effort's model on MASM's low-rank path; the target is against the reference
                key = {
                    "effort-reference": "masm_vs_effort_step",
                    "effort": "masm_vs_effort_lowrank_step",
                }.get(other, f"masm_vs_{other}_step")
                ratios[key] = step_ratio("masm", other)
        if "masm-path-only" in train and "effort-reference" in train:
            ratios["path_only_vs_effort_step"] = step_ratio("masm-path-only", "effort-reference")
        if "fmsd" in train:
            ratios["fmsd_vs_masm_step"] = step_ratio("fmsd", "masm")
        if "frozen-floor" in train:
            ratios["masm_vs_floor_step"] = step_ratio("masm", "frozen-floor")
            if "masm-path-only" in train:
                ratios["path_only_vs_floor_step"] = step_ratio("masm-path-only", "frozen-floor")
        if "full" in train:
            ratios["masm_vs_full_peak_mem"] = masm["peak_mem_mb"] / train["full"]["peak_mem_mb"]
        if "frozen-floor" in train and masm["ops_per_step"] is not None:
            ratios["masm_vs_floor_ops"] = masm["ops_per_step"] / train["frozen-floor"]["ops_per_step"]
        if "frozen-floor" in train and masm.get("gflop_per_step"):
            ratios["masm_vs_floor_flops"] = masm["gflop_per_step"] / train["frozen-floor"]["gflop_per_step"]
        if masm["syncs_per_step"] is not None:
            ratios["masm_syncs_per_step"] = masm["syncs_per_step"]
    if "frozen-floor" in train and "effort-reference" in train:
        # The best masm_vs_effort_step any adapter of these layers could reach here.
        ratios["floor_vs_effort_step"] = step_ratio("frozen-floor", "effort-reference")
    ratios["merged_vs_plain_infer"] = infer["merged_s"] / infer["plain_s"]
    return ratios


def speed_report(settings: SpeedSettings, train: dict, times: dict[str, list[float]], infer: dict) -> dict:
    """The result of a full run (what ``--out`` holds): settings, machine, measurements, ratios, targets."""
    ratios = speed_ratios(train, times, infer)
    targets = dict(TARGETS)
    met = {k: ratios[k] <= v for k, v in targets.items() if k in ratios}
    return {
        "settings": asdict(settings),
        "machine": machine_info(),
        "train": train,
        "infer": infer,
        "ratios": ratios,
        "targets": targets,
        "targets_met": met,
    }


def format_results(results: dict) -> str:
    """The tables ``masm bench speed`` prints: training step per method, inference, ratios and targets."""
    from masm.evaluation.report import format_table

    s = results["settings"]
    rows = [
        [
            name,
            r["step_s"] * 1000 if "step_s" in r else "",
            r["peak_mem_mb"],
            r["trainable"],
            r.get("ops_per_step", ""),
            r.get("syncs_per_step", ""),
            r.get("gflop_per_step", ""),
        ]
        for name, r in results["train"].items()
    ]
    header = ["method", "step ms", "training memory MB", "trainable params", "ops/step", "syncs/step"]
    header.append("GFLOP/step")
    title = (
        f"Training step, {s['backbone']}, batch {s['batch_size']}, {s['device']}, "
        f"precision {s.get('precision', 'auto')}"
        + (", compiled" if s.get("compile") else "")
        + (", captured as a CUDA graph" if s.get("cuda_graph") else "")
    )
    paused = [
        f"{name} mask while timed: {r['mask']}" for name, r in results["train"].items() if r.get("mask")
    ]
    if "infer" not in results:
        return "\n".join([title, format_table(rows, header), *paused])
    out = [
        title + f" (median of {s['steps']} after {s['warmup']} warm-up)",
        format_table(rows, header),
        *paused,
        "",
        "Inference (batch forward, no grad)",
        format_table(
            [
                ["plain backbone", results["infer"]["plain_s"] * 1000],
                ["merged masm", results["infer"]["merged_s"] * 1000],
            ],
            ["model", "ms"],
        ),
        "",
        format_table(
            [
                [k, v, results["targets"].get(k), results["targets_met"].get(k)]
                for k, v in results["ratios"].items()
            ],
            ["ratio", "value", "target (<=)", "met"],
        ),
    ]
    return "\n".join(out)

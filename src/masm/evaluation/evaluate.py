"""Score a detector on test sets and write the reports: the library behind ``masm eval``.

- :mod:`.scoring` runs a detector over frames (failed frames are counted, never replaced);
- :func:`metrics_for` turns one test set's scores into its metrics, deployment metrics included;
- :func:`evaluate_detector` scores data specs (clean and, optionally, under robustness perturbations) and
  writes ``report.json``/``.md``, ``roc.png``, ``predictions.csv``, the robustness report and, when the
  caller passes an :data:`ExampleSheets` writer, one example sheet per test set (the frames people look at
  first, each with its explanation map: :mod:`masm.explain.evaluate` passes one); test sets whose frames
  name their generators, reals included (GenImage, UniversalFakeDetect, Chameleon), also get per-generator
  numbers (:mod:`.generators`), and ``bias_check`` rescores every set re-encoded (:mod:`.bias_check`);
- :func:`evaluate_checkpoint` does the same for a checkpoint directory, with the merged model (inference
  at the plain backbone's speed) and the checkpoint's resolved config in the report's meta.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.reencode import Reencoder
from ..errors import MasmError
from ..models.calibration import Calibration
from ..precision import resolve_device
from .bias_check import bias_check_report
from .calibration import deployment_metrics
from .generators import generators_block, has_generators
from .metrics import evaluate_scores, mean_over_datasets
from .report import PARITY_NOTICE, write_eval_report, write_robustness_report
from .scoring import Shard, score_sharded

logger = logging.getLogger(__name__)

# Writes an evaluation's example sheets into its report folder before the report, which lists them:
# (detector, {test set: [(path, video, label, score), ...]}, out_dir) -> {test set: its report entry}.
# Drawing them needs explanation maps, a layer above this one, so a caller that wants them passes one in
# (masm.explain.examples.sheet_writer).
ExampleSheets = Callable[[torch.nn.Module, Mapping[str, list], Path], Mapping[str, Mapping]]


def metrics_for(
    records: Sequence[Any],
    scores: np.ndarray,
    failed: list[tuple[str, str]],
    log_odds: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> tuple[dict, list]:
    """``evaluate_scores`` on the frames that were scored, and their ``(path, video, label, score)`` rows.

    With ``log_odds``, the result also holds ``"deployment"``: ECE, Brier score and TPR at FPR 1 % and
    0.1 % of the detector's calibrated score per level, and the FPR/TPR its stored operating points give
    here (:func:`masm.evaluation.calibration.deployment_metrics`). When every frame names its generator,
    reals included, ``"generators"`` (each generator's reals against its fakes,
    :func:`masm.evaluation.generators.generators_block`) takes the place of ``"families"``.
    """
    ok = ~np.isnan(scores)
    kept = [r for r, good in zip(records, ok) if good]
    rows = [(r.path, r.video, int(r.label), float(s)) for r, s in zip(kept, scores[ok])]
    result = evaluate_scores(
        [r.path for r in kept],
        [r.video for r in kept],
        [r.label for r in kept],
        scores[ok],
        skipped=failed,
        families=[r.family for r in kept],
    )
    if log_odds is not None and ok.any():
        result["deployment"] = deployment_metrics(
            [r.label for r in kept], log_odds[ok], [r.video for r in kept], calibration
        )
    families = [r.family for r in kept]
    if has_generators([r.label for r in kept], families):
        # Each generator against its own reals replaces each family against all reals: one number per
        # generator, the one the field reports.
        result.pop("families", None)
        kept_log_odds = log_odds[ok] if log_odds is not None else None
        result["generators"] = generators_block(
            [r.label for r in kept], scores[ok], families, kept_log_odds, calibration
        )
    return result, rows


def open_test_sets(
    specs: Sequence[Any],
    *,
    data_root: str | Path | None = None,
    frames: int = 32,
    compression: str = "c23",
    label_dict: Mapping[str, int] | None = None,
    parity: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Data specs (strings) or ready :class:`FrameIndex` objects -> ``{unique name: FrameIndex}``."""
    from ..data.index import FrameIndex
    from ..data.spec import open_dataset

    if not specs:
        raise MasmError("no test data given (use --data SPEC)")
    indexes: dict[str, FrameIndex] = {}
    for spec in specs:
        if isinstance(spec, FrameIndex):
            index = spec
        else:
            index = open_dataset(
                str(spec),
                data_root=data_root,
                frames_per_video=frames,
                compression=compression,
                label_dict=label_dict,
                parity=parity,
                seed=seed,
            )
        name, n = index.name, 2
        while name in indexes:
            name, n = f"{index.name}#{n}", n + 1
        indexes[name] = index
    return indexes


def evaluate_detector(
    detector: torch.nn.Module,
    specs: Sequence[Any],
    *,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    frames: int = 32,
    compression: str = "c23",
    label_dict: Mapping[str, int] | None = None,
    parity: bool = False,
    perturbations: Sequence[tuple[str, int]] = (),
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    shard: Shard | None = None,
    example_sheets: ExampleSheets | None = None,
    bias_check: Reencoder | None = None,
) -> dict[str, Any] | None:
    """Score ``detector`` on every test set in ``specs`` (clean, then under each perturbation).

    Returns ``{"datasets": {name: evaluate_scores result}, "mean": ..., "robustness": {perturbation:
    {level: {name: frame AUC}}} (level 0 = clean; only with perturbations), "report": report.json path or
    None}``. With ``out_dir`` the eval report (clean) and, with perturbations, the robustness report are
    written there. ``parity`` = DeepfakeBench parity (first-N frames, parent-folder video keys).
    ``shard`` spreads the frames over the processes of a ``torch.distributed`` group (every process calls
    this): rank 0 writes the reports and returns the result, the other ranks return None.
    ``example_sheets``: with ``out_dir``, called with the scored frames before the report is written, and
    its result goes into the report (None: no sheets). :func:`masm.explain.evaluate.evaluate_detector`
    passes one that draws ``examples-NAME.png`` per test set.
    ``bias_check`` (a :class:`~masm.data.reencode.Reencoder`): rescore every test set with every image
    re-encoded by it, and report how far each metric moves (result and report.json key ``"bias_check"``,
    :func:`masm.evaluation.bias_check.bias_check_report`).
    """
    from ..data.transforms import build_transform

    device = resolve_device(device)
    detector.to(device)
    indexes = open_test_sets(
        specs,
        data_root=data_root,
        frames=frames,
        compression=compression,
        label_dict=label_dict,
        parity=parity,
        seed=seed,
    )
    shard = shard or Shard()
    preprocessing = detector.preprocessing
    calibration = getattr(detector, "calibration", None)
    datasets: dict[str, dict] = {}
    predictions: dict[str, list] = {}
    robustness: dict[str, dict[int, dict[str, float | None]]] = {}
    reencoded: dict[str, dict] = {}
    # (tag, perturbation, re-encoding) of each pass over the test sets: as given, perturbed, re-encoded
    passes: list[tuple[str, tuple[str, int] | None, Reencoder | None]] = [("clean", None, None)]
    passes += [(f"{name}:{level}", (name, level), None) for name, level in perturbations]
    if bias_check is not None:
        passes.append(("bias check", None, bias_check))
    for tag, perturbation, reencode in passes:
        transform = build_transform(preprocessing, train=False, perturbation=perturbation, seed=seed)
        transform.reencode = reencode
        for name, index in indexes.items():
            scored = score_sharded(
                detector,
                index.records,
                transform,
                shard,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                precision=precision,
                progress=progress,
                desc=f"{name} [{tag}]",
            )
            if scored is None:  # another rank than 0: its scores went to rank 0
                continue
            result, rows = metrics_for(index.records, *scored, calibration=calibration)
            if reencode is not None:
                reencoded[name] = result
            elif perturbation is not None:
                per_level = robustness.setdefault(perturbation[0], {})
                per_level.setdefault(perturbation[1], {})[name] = result["frame"]["auc"]
            else:
                result["data"] = index.summary()
                datasets[name], predictions[name] = result, rows
    if not shard.is_main:
        return None
    for per_level in robustness.values():
        per_level[0] = {name: datasets[name]["frame"]["auc"] for name in datasets}
    full_meta = {
        "seed": seed,
        "frames_per_video": frames,
        "frame_sampling": "first-N (parity)" if parity else "linspace",
        "parity": parity,
        **({"parity_notice": PARITY_NOTICE} if parity else {}),
        "perturbations": [f"{n}:{lv}" for n, lv in perturbations],
        "processes": shard.world_size,
        **dict(meta or {}),
    }
    bias = bias_check_report(datasets, reencoded, bias_check.as_dict()) if bias_check is not None else None
    report_path = None
    if out_dir is not None:
        sheets = example_sheets(detector, predictions, Path(out_dir)) if example_sheets else {}
        report_path = write_eval_report(
            out_dir, datasets, predictions, full_meta, examples=sheets, bias_check=bias
        )
        if robustness:
            write_robustness_report(out_dir, robustness)
    return {
        "datasets": datasets,
        "mean": mean_over_datasets(datasets),
        "robustness": robustness,
        "bias_check": bias,
        "meta": full_meta,
        "report": report_path,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    specs: Sequence[Any],
    *,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_detector` for checkpoint directory ``checkpoint``, loaded merged (fast inference).

    The report's meta holds the checkpoint path, its resolved model config and, for a checkpoint written
    by ``masm train``, the run's training config and step.
    """
    from ..models.checkpoint import read_checkpoint_config
    from ..models.factory import load_checkpoint

    config = read_checkpoint_config(checkpoint)
    detector = load_checkpoint(checkpoint, device=resolve_device(device), merge=True)
    info = config.get("info") or {}
    meta = {
        "checkpoint": str(checkpoint),
        "backbone": config["model"].get("backbone"),
        "method": (config["model"].get("method") or {}).get("name"),
        "trained_step": info.get("global_step"),
        "config": {"model": config["model"], "train": info.get("train_config")},
        **dict(kwargs.pop("meta", None) or {}),
    }
    return evaluate_detector(detector, specs, out_dir=out_dir, device=device, meta=meta, **kwargs)


def undefined_metric_notes(result: Mapping[str, Any]) -> list[str]:
    """Messages for test sets whose frame AUC is undefined (one class only)."""
    notes = []
    for name, entry in result["datasets"].items():
        if entry["frame"]["auc"] is None:
            notes.append(f"{name}: {entry['frame'].get('note', 'AUC undefined')}")
    return notes


def summary_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of frame and video AUC per test set, per forgery family and their mean (terminal).

    Below each test set's pooled row, one row per family of its fakes: that family against all the set's
    reals. The mean row averages the test sets' pooled AUCs only, and says over how many.
    """
    from .report import format_table, mean_label

    rows = []
    for name, r in result["datasets"].items():
        rows.append([name, r["frame"]["auc"], r["video"]["auc"], r["frame"]["n_real"], r["frame"]["n_fake"]])
        for family, f in r.get("families", {}).items():
            rows.append(
                [f"{name} / {family}", f["frame"]["auc"], f["video"]["auc"], "", f["frame"]["n_fake"]]
            )
    mean = result["mean"]
    rows.append([mean_label(mean, "frame"), mean["frame"]["auc"], mean["video"]["auc"], "", ""])
    table = format_table(rows, ["Dataset", "frame AUC", "video AUC", "real frames", "fake frames"])
    if any(r.get("families") for r in result["datasets"].values()):
        table += "DATASET / FAMILY rows: that family's fakes against all of the test set's reals.\n"
    return table

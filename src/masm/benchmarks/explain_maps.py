"""``masm bench explain``: do the quick demo detector's explanation maps point at the forgery?

For each seed the quick demo (``masm demo --quick --seed N``: data, training and detector all follow the
seed) is run into ``WORK/seed-N`` (``--work``) unless its detector is already there. Its in-distribution
test fakes (new crops of the training photos, the training family) are made again with the regions they
were forged in (:func:`masm.data.synth.make_fake_with_region`; each regenerated crop must equal the file
the demo wrote, byte for byte, or the run stops), and maps are scored against the regions (pixel AUC,
pointing game; :mod:`masm.explain.localization`): masm's maps (attention relevance) and token Grad-CAM,
next to three baselines, a uniform, a random and a plain input-gradient map.

Spread: mean ± std over the seeds. A seed changes the detector (its data and training) and the random
map, so the spread is how much the figures move between equally made demo detectors, not only the random
map's noise. Writes the result to ``--out FILE.json`` and, beside it, ``FILE.png`` (four fakes with their
true region and each method's map, for the first seed's detector).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .common import add_common_arguments, beside, write_result

METHODS = ("attention relevance", "grad-cam", "input gradient", "random", "uniform")
BASELINES = ("input gradient", "random", "uniform")
GOAL_AUC = 0.75


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="quick demo seeds")
    parser.add_argument(
        "--split", default="test", choices=("test", "val"), help="demo split whose fakes are explained"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward and backward")
    add_common_arguments(
        parser,
        "explain",
        figures="the maps of four fakes beside it as FILE.png",
        work="quick demo runs, one folder per seed (reused when there)",
        progress="no progress bars while training",
    )


def run(args) -> int:
    from masm.errors import MasmError

    if not args.seeds:
        raise MasmError("--seeds needs at least one seed")
    start = time.perf_counter()
    per_seed = {seed: evaluate_seed(args, seed) for seed in args.seeds}
    summary = summarise(per_seed)
    result = {
        "seeds": args.seeds,
        "split": args.split,
        "per_seed": per_seed,
        "summary": summary,
        "goal": goal_verdict(summary),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_result(args.out, result, format_table(result), figures=(beside(args.out, ".png"),))
    return 0


def evaluate_seed(args, seed: int) -> dict:
    """Train (or reuse) the quick demo at ``seed`` and score every method's maps on its fakes."""
    from dataclasses import replace

    import torch

    from masm.data.transforms import build_transform
    from masm.demo.run import QUICK, run_demo
    from masm.explain import explain_batches
    from masm.explain.localization import input_gradient_maps, localization_scores, random_maps, uniform_maps
    from masm.models import load_checkpoint

    demo_dir = args.work / f"seed-{seed}"
    if not (demo_dir / "model" / "config.json").is_file():
        print(f"seed {seed}: running the quick demo into {demo_dir} ...", flush=True)
        run_demo(demo_dir, replace(QUICK, seed=seed), progress=not args.no_progress)
    detector = load_checkpoint(demo_dir / "model", merge=True)
    images, masks = forged_with_regions(demo_dir / "data" / args.split)
    transform = build_transform(detector.preprocessing, train=False)
    pixels = torch.stack([transform(image) for image in images])
    size = pixels.shape[-1]
    grid = size // detector.family.patch_size(detector.backbone)
    relevance = explain_batches(detector, pixels, batch_size=args.batch_size, method="relevance")
    maps = {
        "attention relevance": relevance.maps,
        "grad-cam": explain_batches(detector, pixels, batch_size=args.batch_size, method="grad-cam").maps,
        "input gradient": input_gradient_maps(detector, pixels, args.batch_size),
        "random": random_maps(len(images), grid, size, seed),
        "uniform": uniform_maps(len(images), size),
    }
    if seed == args.seeds[0]:
        from masm.explain.render import method_sheet

        shown = {name: m[:4].numpy() for name, m in maps.items() if name != "uniform"}
        method_sheet(images[:4], masks[:4], shown, beside(args.out, ".png"))
    scores: dict = {name: localization_scores(m.numpy(), masks) for name, m in maps.items()}
    scores["detection"] = {
        "fakes_flagged": float((relevance.scores >= 0.5).float().mean()),
        "mean_score": float(relevance.scores.mean()),
    }
    return scores


def forged_with_regions(split_dir: Path):
    """The fakes of a demo split, regenerated with their regions: ``(uint8 images, bool masks)``.

    Only the training families (the in-distribution fakes). Every regenerated crop is checked against the
    file the demo wrote: the region belongs to exactly that crop.
    """
    import numpy as np

    from masm.data import synth
    from masm.data.images import load_rgb
    from masm.demo.experiment import DEFAULT_TRAIN_FAMILIES
    from masm.demo.photos import demo_photos
    from masm.errors import MasmError

    made = json.loads((split_dir / "synth.json").read_text())
    photos = demo_photos()[0]
    images, masks = [], []
    for family in DEFAULT_TRAIN_FAMILIES:
        stream = 1 + list(synth.FAMILIES).index(family)
        for index in range(made["counts"]["fake"][family]):
            rng = synth.sample_rng(made["seed"], stream, index)
            image, region = synth.make_fake_with_region(family, photos, rng, made["size"], made["strength"])
            path = split_dir / "fake" / family / f"{index:06d}.png"
            if not np.array_equal(image, load_rgb(str(path))):
                raise MasmError(
                    f"{path}: regenerated crop differs from the file; rerun the demo into a new --work"
                )
            images.append(image)
            masks.append(region >= 0.5)
    return images, np.stack(masks)


def summarise(per_seed: dict) -> dict:
    out: dict = {}
    for method in METHODS:
        out[method] = {}
        for metric in ("pixel_auc", "pointing_game"):
            values = [per_seed[s][method][metric] for s in per_seed]
            out[method][metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    return out


def goal_verdict(summary: dict) -> dict:
    """Relevance pixel AUC >= 0.75 and above every baseline by more than the larger of the two spreads."""
    ours = summary["attention relevance"]["pixel_auc"]
    margins = {}
    for method in BASELINES:
        base = summary[method]["pixel_auc"]
        margins[method] = {"gap": ours["mean"] - base["mean"], "spread": max(ours["std"], base["std"])}
    met = ours["mean"] >= GOAL_AUC and all(m["gap"] > m["spread"] for m in margins.values())
    return {"met": met, "auc_goal": GOAL_AUC, "margins": margins}


def format_table(result: dict) -> str:
    """The summary ``masm bench explain`` prints: each map's scores over the seeds, and the goal's verdict."""
    seeds = result["seeds"]
    lines = [
        f"explanation maps of the quick demo detector on its {result['split']} split's in-distribution "
        f"fakes, seeds {' '.join(map(str, seeds))} (mean ± std over seeds)",
        f"  {'map':<20} {'pixel AUC':>17} {'pointing game':>17}",
    ]
    for method, row in result["summary"].items():
        auc, hit = row["pixel_auc"], row["pointing_game"]
        lines.append(
            f"  {method:<20} {auc['mean']:8.4f} ± {auc['std']:.4f} {hit['mean']:8.4f} ± {hit['std']:.4f}"
        )
    per_seed = result["per_seed"]
    count = per_seed[seeds[0]]["uniform"]["images"]
    flagged = statistics.fmean(per_seed[s]["detection"]["fakes_flagged"] for s in seeds)
    lines.append(f"  fakes per seed: {count}; share the detector flags (score >= 0.5): {flagged:.3f}")
    goal = result["goal"]
    gaps = ", ".join(f"{k} +{v['gap']:.4f} (spread {v['spread']:.4f})" for k, v in goal["margins"].items())
    lines.append(
        f"  goal (relevance pixel AUC >= {goal['auc_goal']}, above every baseline by more than the spread): "
        f"{'met' if goal['met'] else 'NOT met'}; {gaps}"
    )
    lines.append(f"  {result['seconds']:.0f} s")
    return "\n".join(lines)

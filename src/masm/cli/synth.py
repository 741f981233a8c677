"""``masm synth --out DIR``: write a synthetic multi-forgery dataset as a plain ``folder:`` dataset."""

from __future__ import annotations

from pathlib import Path

# The strength masm demo and masm bench quality use (masm.demo.experiment.DEMO_STRENGTH; repeated here so
# that --help does not import the demo, a test keeps the two equal).
DEMO_STRENGTH = 5.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic multi-forgery dataset",
        description=(
            "Write real photo crops and crops with one local manipulation from each forgery family, as a "
            "folder dataset (OUT/real/, OUT/fake/FAMILY/, OUT/synth.json) that --data folder:OUT reads."
        ),
    )
    parser.add_argument("--out", required=True, help="output folder (gets real/, fake/<family>/, synth.json)")
    parser.add_argument(
        "--real-dir", default=None, help="folder of your own photos (default: scikit-image's sample photos)"
    )
    parser.add_argument("--families", default=None, help="comma-separated family names (default: all)")
    parser.add_argument("--per-family", type=int, default=200, help="fake crops per family")
    parser.add_argument(
        "--num-real", type=int, default=None, help="real crops (default: per-family x number of families)"
    )
    parser.add_argument("--size", type=int, default=64, help="crop side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help=f"artifact magnitude multiplier (1: subtle; masm demo and masm bench quality use {DEMO_STRENGTH:g})",
    )
    parser.add_argument(
        "--masks", action="store_true", help="also write each fake's forgery region (masks/<family>/<id>.png)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.data.synth import synthesize

    summary = synthesize(
        args.out,
        families=args.families.split(",") if args.families is not None else None,
        per_family=args.per_family,
        num_real=args.num_real,
        size=args.size,
        seed=args.seed,
        real_dir=args.real_dir,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        strength=args.strength,
        masks=args.masks,
    )
    counts = summary["counts"]
    families = ", ".join(f"{name} {n}" for name, n in counts["fake"].items())
    print(
        f"wrote {counts['real']} real and {sum(counts['fake'].values())} fake crops ({families}) to {args.out}; "
        f"parameters and counts in {Path(args.out) / 'synth.json'}"
    )
    return 0

"""``masm preprocess``: videos or photos -> aligned face crops + a DeepfakeBench-format JSON index."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="extract aligned face crops from videos or photos",
        description=(
            "Evenly spaced frames -> largest face -> ArcFace 5-point alignment -> OUT/frames/<video>/<idx>.png "
            "and OUT/NAME.json (DeepfakeBench schema, read it as dfb:OUT/NAME.json). SRC is a video or image, "
            "a folder of them, or a folder with real/ and fake/ (fake/<family>/) sub-folders. Reruns skip "
            "finished videos."
        ),
    )
    parser.add_argument("src", help="video/image file, folder of them, or folder with real/ and fake/")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", required=True, help="dataset name (JSON file name and top-level key)")
    parser.add_argument(
        "--label",
        help="label of every input of a SRC without real/ and fake/ sub-folders (real, fake, FF-real, "
        "FF-DF, ...; default: none, and such a SRC needs one)",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split in the JSON")
    parser.add_argument("--frames", type=int, default=32, help="frames per video, evenly spaced (0: all)")
    parser.add_argument("--size", type=int, default=256, help="side of the face crop in pixels")
    parser.add_argument("--scale", type=float, default=1.3, help="margin: crop side / aligned face size")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one video each)")
    parser.add_argument("--detect-width", type=int, default=640, help="detect faces at this width (0: full)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.data.preprocess import Settings, format_summary, run_preprocess
    from masm.errors import MasmError

    if args.frames < 0 or args.size < 8 or args.scale <= 0 or args.workers < 1 or args.detect_width < 0:
        raise MasmError(
            "--frames >= 0, --size >= 8, --scale > 0, --workers >= 1 and --detect-width >= 0 please"
        )
    settings = Settings(frames=args.frames, size=args.size, scale=args.scale, detect_width=args.detect_width)
    summary = run_preprocess(
        args.src,
        args.out,
        args.name,
        label=args.label,
        settings=settings,
        workers=args.workers,
        split=args.split,
        progress=not args.no_progress,
    )
    print(format_summary(summary))
    return 0 if summary["frames_written"] else 1

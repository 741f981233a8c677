"""``masm detect``: score images, videos and folders with a checkpoint; one JSON line per input."""

from __future__ import annotations

import json
import sys

# Fewer inputs than this get no progress bar.
PROGRESS_MIN_INPUTS = 8


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="score images and videos (P(fake)) with a checkpoint",
        description=(
            "Score image files, video files and folders of them (recursed; recognised by content), or '-' "
            "for a list of paths on stdin. Faces are detected and aligned as the checkpoint was trained "
            "(several faces in an image: the highest score counts; a video: the mean over evenly spaced "
            "frames). Writes one JSON object per input {input, kind, score, raw_score, label, "
            "operating_point, faces, frames, error, note} to stdout or --out: score is the calibrated "
            "P(fake) (the raw one if the detector stores no calibration), label the decision at the "
            "operating point it names; a table when stdout is a terminal. Exit status 0: all scored, "
            "1: some input failed, 2: usage error."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory (adapter or merged weights)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, video, folder, or - (stdin)")
    parser.add_argument("--out", help="write the JSON lines to this file (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    parser.add_argument("--frames", type=int, default=32, help="evenly spaced frames per video (0: all)")
    parser.add_argument("--no-face", action="store_true", help="score whole images (inputs are face crops)")
    parser.add_argument(
        "--operating-point",
        metavar="NAME",
        help="label at this stored operating point (fpr=0.01, fpr=0.001, eer; default: the one stored with "
        "the detector, else 0.5 with a note)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="label 'fake' at score >= this number instead of an operating point (default: none)",
    )
    parser.add_argument("--per-frame", action="store_true", help="add per-frame scores to video results")
    parser.add_argument(
        "--explain",
        metavar="DIR",
        help="write explanation maps to DIR: each image and scored video frame overlaid with where the "
        "evidence for 'fake' is (PNG), a contact sheet per video; adds 'explanation' to the JSON lines "
        "(default: no maps)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.inference import Scorer, ScorerOptions, expand_inputs

    options = ScorerOptions(
        batch_size=args.batch_size,
        frames=args.frames,
        faces=not args.no_face,
        operating_point=args.operating_point,
        threshold=args.threshold,
        per_frame=args.per_frame,
        explain_dir=args.explain,
    )
    options.validate()
    scorer = Scorer(args.checkpoint, options, device=_device(args.device))
    if scorer.decisions["frame"].note:  # no operating point stored (a video's fallback is in its line)
        print(f"masm detect: note: {scorer.decisions['frame'].note}", file=sys.stderr)
    inputs = list(expand_inputs(args.inputs))
    show_table = sys.stdout.isatty()
    sink = _open_out(args.out) if args.out else (None if show_table else sys.stdout)
    results = scorer.score_inputs(inputs)
    failed = 0
    rows = []
    try:
        for result in _progress(results, len(inputs), args.no_progress):
            failed += result["error"] is not None
            if sink is not None:
                sink.write(json.dumps(result) + "\n")
                sink.flush()
            if show_table:
                rows.append(result)
    finally:
        if sink is not None and sink is not sys.stdout:
            sink.close()
    if show_table:
        print(format_table(rows))
    if failed:
        print(f"masm detect: {failed} of {len(inputs)} inputs could not be scored", file=sys.stderr)
    return 1 if failed else 0


def format_table(results: list[dict]) -> str:
    """A human-readable table of results (for a terminal)."""
    header = ("input", "kind", "score", "label", "faces", "frames", "error / note")
    rows = [header]
    for r in results:
        score = "" if r["score"] is None else f"{r['score']:.4f}"
        rows.append(
            (
                r["input"],
                r["kind"] or "",
                score,
                r["label"] or "",
                "" if r["faces"] is None else str(r["faces"]),
                "" if r["frames"] is None else str(r["frames"]),
                (r["error"] or r.get("note") or "").removeprefix(f"{r['input']}: "),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _device(name: str):
    import torch

    from masm.errors import MasmError

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise MasmError(f"device {name!r} is not usable here ({err})") from None
    return device


def _open_out(path: str):
    from pathlib import Path

    from masm.errors import MasmError

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        raise MasmError(f"cannot write {path}: {err.strerror or err}") from None


def _progress(results, total: int, off: bool):
    from tqdm import tqdm

    disable = off or total < PROGRESS_MIN_INPUTS or not sys.stderr.isatty()
    return tqdm(results, total=total, unit="input", disable=disable, file=sys.stderr)

"""``masm bench preprocess``: face preprocessing throughput on this machine.

Makes its own 720p clip (scikit-image's astronaut photo, scaled up and moved a few pixels per frame,
encoded with PyAV libx264), then times, as the median of ``--repeats`` runs: decoding the sampled frames,
face detection + landmarks at several detection widths (downscaled vs full resolution), and the whole
per-video pipeline (decode, detect, align, write PNGs) as ``masm preprocess`` runs it.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

from .common import add_common_arguments, write_result


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=16, help="frames sampled from the clip")
    parser.add_argument("--clip-frames", type=int, default=48, help="frames in the generated clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    parser.add_argument(
        "--detect-widths", default="320,640,0", help="comma-separated detection widths (0: full resolution)"
    )
    add_common_arguments(parser, "preprocess")


def make_clip(path: Path, num_frames: int, width: int = 1280, height: int = 720) -> Path:
    """A 720p H.264 clip of the astronaut (face about 200 px wide) drifting a few pixels per frame."""
    import av
    import cv2
    import numpy as np
    import skimage.data

    face = cv2.resize(skimage.data.astronaut(), (640, 640), interpolation=cv2.INTER_CUBIC)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(num_frames):
            canvas = np.full((height, width, 3), 96, np.uint8)
            x, y = 200 + 4 * i, 40 + (i % 10)
            canvas[y : y + 640, x : x + 640] = face[: height - y, : width - x]
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> int:
    from masm.data.faces import FaceAligner
    from masm.data.preprocess import Job, Settings, process_job
    from masm.data.video import read_frames
    from masm.errors import MasmError

    if args.frames < 1 or args.repeats < 1 or args.clip_frames < args.frames:
        raise MasmError("need --frames >= 1, --repeats >= 1 and --clip-frames >= --frames")
    widths = [int(w) for w in args.detect_widths.split(",") if w.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip720p.mp4", args.clip_frames)
        frames = read_frames(clip, args.frames)
        n = len(frames)
        t = _median_time(lambda: read_frames(clip, args.frames), args.repeats)
        rows.append({"stage": f"decode {n} of {args.clip_frames} frames (PyAV)", "detect_width": None,
                     "seconds": t, "fps": n / t, "faces_found": None})  # fmt: skip
        for width in widths:
            aligner = FaceAligner(256, 1.3, detect_width=width)
            found = sum(bool(aligner.detect(rgb)) for _, rgb in frames)  # also warms the models up
            t = _median_time(lambda a=aligner: [a.detect(rgb) for _, rgb in frames], args.repeats)
            rows.append({"stage": "detect + landmarks", "detect_width": width or 1280, "seconds": t,
                         "fps": n / t, "faces_found": f"{found}/{n}"})  # fmt: skip
        for width in widths:
            settings = Settings(frames=args.frames, size=256, scale=1.3, detect_width=width)
            job = Job("clip720p", str(clip), "real", None, "video")
            results = []

            def whole(settings=settings, job=job, results=results):
                out = Path(tempfile.mkdtemp(dir=tmp))  # fresh folder: no resume
                results.append(process_job(job, out, settings))

            t = _median_time(whole, args.repeats)
            rows.append({"stage": "whole pipeline (decode+detect+align+PNG)", "detect_width": width or 1280,
                         "seconds": t, "fps": n / t, "faces_found": f"{len(results[-1]['frames'])}/{n}"})  # fmt: skip
    result = {"frames": n, "repeats": args.repeats, "rows": rows}
    write_result(args.out, result, format_table(result, platform.processor() or platform.machine()))
    return 0


def format_table(result: dict, machine: str) -> str:
    """The summary ``masm bench preprocess`` prints: seconds and frames/s of each stage on ``machine``."""
    head = f"face preprocessing, 1280x720 clip, {result['frames']} frames, median of {result['repeats']}"
    lines = [
        f"{head}, {machine}",
        f"{'stage':44s} {'detect px':>9s} {'seconds':>8s} {'frames/s':>9s} {'faces':>7s}",
    ]
    for r in result["rows"]:
        dw = "" if r["detect_width"] is None else str(r["detect_width"])
        lines.append(
            f"{r['stage']:44s} {dw:>9s} {r['seconds']:8.3f} {r['fps']:9.1f} {r['faces_found'] or '':>7s}"
        )
    return "\n".join(lines)

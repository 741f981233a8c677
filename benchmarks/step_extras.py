"""What MASM adds to its layer path per training step: the guard's two projections, the regularisers, the
mask's statistics and its pausing (with the mask active, as ``masm bench speed`` times it), the on-device
finite check, and the build of every layer's operands, each timed alone (median of repeated calls) on one
MASM detector.

    python benchmarks/step_extras.py [--backbone clip-vit-b16-random] [--batch-size 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="clip-vit-b16-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    from masm.benchmarks.speed import SpeedSettings, _TrainingStep
    from masm.method import project_gradients, regularizers, reproject_guarded
    from masm.training.health import not_finite

    step = _TrainingStep("masm", SpeedSettings(args.backbone, args.batch_size), torch.device("cpu"))
    step()  # gradients, optimizer state and the guard's stacked bases exist from here on

    def regularisers_forward_backward():
        sum(regularizers(step.detector, step.masm_config, step.groups).values()).backward()

    skip = torch.zeros((), dtype=torch.bool)

    def mask_pause():
        step.controller.apply(step.optimizer)
        step.controller.restore()

    def build_operands():
        for group in step.groups:
            group.begin_pass()
            group.end_pass()

    grads = [p.grad for p in step.params if p.grad is not None]
    parts = {
        "guard: project gradients": lambda: project_gradients(step.detector, step.groups),
        "guard: re-project factors": lambda: reproject_guarded(step.detector, step.groups, skip),
        "regularisers, forward + backward": regularisers_forward_backward,
        "mask: observe gradients": lambda: step.controller.observe(skip),
        "mask: pause and put back": mask_pause,
        "finite check": lambda: not_finite([grads[0].sum()], grads, torch.device("cpu")),
        "operands of every layer": build_operands,
    }
    print(f"{args.backbone}, batch {args.batch_size}, cpu, median of {args.repeats}")
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"  {name:34s} {statistics.median(times) * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

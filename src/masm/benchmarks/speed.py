"""``masm bench speed``: training-step time, inference time and peak memory of MASM vs the baselines.

Step times are medians of ``--steps`` timed steps after ``--warmup`` untimed ones, all methods in one
process and timed round-robin (one step of each method per round, the order rotating). A step-time ratio
is the median over rounds of the ratio of the two methods' steps in that round, so that the machine's
drift over minutes and its bursts of load do not enter the ratios. Memory is measured for each method in its own
fresh process, so that its peak is its own. Every method trains on the same random batch. A training step
is what the trainer does: forward, the method's full loss (MASM's regularisers included), backward, the
selective mask and semantic guard around Adam, and the trainer's on-device check that the step is finite
(:mod:`masm.training.health`) with the fused Adam skipping on it. MASM is timed in its steady state: the
mask active, with some layers paused whole and some in part, as in the demo's run (:func:`steady_mask`;
the JSON records what was paused). Compared:

* ``masm``: K=4, m=4 subspaces on the attention projections, low-rank forward;
* ``fmsd``: MASM on the fraction ``select.fraction`` (default 0.5) of the attention projections that FMSD
  adapts, the mask's subspace balance on. Its selection phase runs once before training and is not part of
  a step, so here the layers are fixed instead of selected: spread evenly over the targets in model order,
  the first one included, so that backward runs down to the first block as it does for ``masm``. A real
  selection that skips the early blocks makes a step cheaper still (backward stops at the lowest adapted
  layer); this row measures only the saving of adapting fewer layers;
* ``effort-reference``: Effort's reference formula, ``W_main + U diag(S) Vᵀ`` rebuilt every forward
  (:mod:`masm.benchmarks.effort_reference`);
* ``effort``: the same Effort model (K=1, m=1) on MASM's low-rank code path;
* ``lora`` (peft, rank 16, same targets) and ``full`` fine-tuning;
* ``masm-path-only``: MASM's K=4, m=4 subspaces on the low-rank path and nothing else (semantic guard,
  regularisers and mask off): what the adapter's own matmuls cost, apart from what MASM adds to them;
* ``frozen-floor``: every weight frozen, only the targeted Linears' biases train. Backward then carries the
  input gradient through every adapted layer, as any method that trains those layers must, and computes no
  weight gradient and no adapter work. It is the least step time an adapter on these layers can have, so
  ``floor_vs_effort_step`` bounds from below what ``masm_vs_effort_step`` can reach on the machine.

Inference compares the merged MASM detector with the plain backbone (+ head), interleaving the two.
Memory: on CUDA, peak allocated bytes above those allocated after the model was built. On CPU there is no
allocator to ask, and the resident set size mostly shows what glibc keeps cached, so the training memory is
counted exactly from the tensors instead: activations saved for backward (unique storages, through
``torch.autograd.graph.saved_tensors_hooks``) + gradients + optimizer state. ``ops/step``: the ATen
operations one training step dispatches (:func:`count_dispatched_ops`), what bounds a GPU step at small
batches; ``syncs/step``: those of them that make the host wait for the device; ``GFLOP/step``: its
arithmetic (:func:`count_flops`), what bounds a step where each operation is large.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

TRAIN_METHODS = [
    "masm",
    "fmsd",
    "effort-reference",
    "effort",
    "lora",
    "full",
    "frozen-floor",
    "masm-path-only",
]


@dataclass
class SpeedSettings:
    backbone: str = "clip-vit-b16-random"
    batch_size: int = 8
    steps: int = 5
    warmup: int = 2
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    precision: str = "auto"  # as the trainer's: bf16 autocast on CUDA, fp32 on CPU (TF32 matmuls on CUDA)
    compile: bool = False  # each method's model through torch.compile (as training's compile: true)
    cuda_graph: bool = False  # each method's whole step captured as a CUDA graph (training's cuda_graph)


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
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file (default: none)")


def run(args) -> int:
    from ..errors import MasmError

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
    print(format_results(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


def run_speed_benchmark(
    settings: SpeedSettings, methods: list[str] = TRAIN_METHODS, memory_only=False
) -> dict:
    train = {method: _in_fresh_process(_memory_worker, method, settings) for method in methods}
    if memory_only:
        return {"settings": asdict(settings), "machine": machine_info(), "train": train, "ratios": {}}
    times = _in_fresh_process(_timing_worker, methods, settings)
    for method in methods:
        train[method]["step_s"] = statistics.median(times[method])
        train[method]["step_times_s"] = times[method]
    infer = _in_fresh_process(_infer_worker, "masm", settings)

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
    targets = {
        "masm_vs_floor_ops": 1.35,
        "masm_syncs_per_step": 0,
        "masm_vs_floor_step": 1.05,
        "masm_vs_effort_step": 0.9,
        "masm_vs_full_step": 0.75,
        "merged_vs_plain_infer": 1.02,
        "masm_vs_full_peak_mem": 1.0,
    }
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
    from ..evaluation.report import format_table

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


# -- workers (run in fresh processes) ---------------------------------------------------------------------
# glibc returns large freed blocks to the OS and maps them again on the next allocation, so each step pays
# page faults for its activations, and how many depends on what the previous step (of another method)
# freed: the floor's step times spread over 2.36-2.90 s without these settings, 2.32-2.57 s with them.
# Fixed thresholds keep freed memory in the process; they apply to the benchmark's worker processes only.
_STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def _in_fresh_process(fn, what, settings: SpeedSettings) -> dict:
    saved = {key: os.environ.get(key) for key in _STEADY_MALLOC}
    os.environ.update({key: value for key, value in _STEADY_MALLOC.items() if saved[key] is None})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, what, settings).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _setup(settings: SpeedSettings):
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    from ..precision import configure_matmul_precision

    torch.manual_seed(0)
    device = torch.device(settings.device)
    configure_matmul_precision(device)  # what the trainer does: TF32 for whatever runs in fp32 on CUDA
    return device


def _build(method: str, settings: SpeedSettings):
    from ..method.apply import find_targets
    from ..models import create_detector
    from .effort_reference import apply_effort_reference

    if method == "effort-reference":
        detector = create_detector(settings.backbone, "linear")
        apply_effort_reference(detector.backbone, detector.family.attention_targets)
        return detector, None
    if method == "masm-path-only":
        from ..models.methods import method_config

        bare = {"semantic_guard": "off", "lambda_orth": 0.0, "lambda_spec": 0.0, "mask": {"enabled": False}}
        detector = create_detector(settings.backbone, method_config("masm", {"masm": bare}))
        return detector, detector.config.method.masm_config
    if method == "fmsd":
        from ..models.methods import method_config

        plain = create_detector(settings.backbone, "linear")
        config = method_config("fmsd")
        names = [n for n, _ in find_targets(plain.backbone, plain.config.method.masm.target_modules)]
        config.masm.select.layers = spread_evenly(names, config.masm.select.fraction)
        detector = create_detector(settings.backbone, config)
        return detector, detector.config.method.masm_config
    if method == "frozen-floor":
        detector = create_detector(settings.backbone, "linear")
        for _, linear in find_targets(detector.backbone, detector.family.attention_targets):
            if linear.bias is not None:  # e.g. DINOv3's k_proj has none
                linear.bias.requires_grad_(True)
        return detector, None
    detector = create_detector(settings.backbone, method)
    return detector, detector.config.method.masm_config


def spread_evenly(names: list[str], fraction: float) -> list[str]:
    """``ceil(fraction · L)`` of ``names`` (at least one) at even spacing, the first one included."""
    import math

    keep = max(1, math.ceil(fraction * len(names)))
    return [names[i * len(names) // keep] for i in range(keep)]


class _TrainingStep:
    """One method's detector, batch, optimizer and mask controller, and a callable training step."""

    def __init__(self, method: str, settings: SpeedSettings, device, graphed: bool = False):
        import torch

        from ..training import make_optimizer

        self.detector, self.masm_config = _build(method, settings)
        self.detector.to(device).train()
        self.forward = torch.compile(self.detector) if settings.compile else self.detector
        self.device = device
        self.precision = settings.precision
        size = self.detector.preprocessing.input_size
        generator = torch.Generator().manual_seed(0)  # the same batch for every method
        self.x = torch.randn(settings.batch_size, 3, size, size, generator=generator).to(device)
        self.y = torch.randint(0, 2, (settings.batch_size,), generator=generator).to(device)
        self.params = self.detector.trainable_parameters()
        # the trainer's optimizer (capturable under cuda_graph, as the trainer's)
        self.optimizer = make_optimizer(self.params, "adam", capturable=graphed, lr=1e-4)
        from ..method import layer_groups

        # what the trainer keeps: the MASM layers, grouped by shape for the batched guard and regularisers
        self.groups = layer_groups(self.detector)
        self.controller = None
        self.mask_state = None
        if self.masm_config is not None and self.masm_config.mask.enabled:
            from dataclasses import replace

            from ..method import SelectiveMaskController

            held = replace(self.masm_config.mask, warmup=0, interval=10**9)  # held as set: no recompute
            self.controller = SelectiveMaskController(self.detector, held)
            self.mask_state = steady_mask(self.controller)
        # cuda_graph: eager steps on a side stream first, then the step captured once and replayed
        self.graphed, self.graph, self.eager_steps = graphed, None, 0

    def __call__(self) -> None:
        from ..training.cuda_graph import WARMUP, capture_graph, side_stream

        if self.graph is not None:
            self.graph.replay()
        elif self.graphed and self.eager_steps >= WARMUP:
            self.graph, _ = capture_graph(self.step)
            self.graph.replay()
        else:
            with side_stream(self.graphed):
                self.step()
            self.eager_steps += 1
        _sync(self.device)

    def step(self) -> None:
        """The trainer's step, without waiting for the device."""
        from ..method import subspace_update, total_loss
        from ..precision import autocast_for
        from ..training.health import not_finite

        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.device, self.precision, cache=not self.graphed):
            logits = self.forward(self.x)
        loss, terms = total_loss(logits, self.y, self.detector, self.masm_config, self.groups)
        loss.backward()
        # the trainer's step: finite check on the device, the fused optimizer skipping on it
        grads = [p.grad for p in self.params if p.grad is not None]
        bad_loss, bad_grad, _ = not_finite([terms["total"]], grads, self.device)
        skip = bad_loss | bad_grad
        self.optimizer.found_inf = skip.float()
        with subspace_update(self.detector, self.optimizer, self.controller, self.groups, skip=skip):
            self.optimizer.step()


def steady_mask(controller) -> dict:
    """Put ``controller`` in a steady state like the demo's run (8-12 of 24 layers partly paused, a quarter
    paused whole): the mask its own rules give for a seeded, skewed learning state (a few subspaces of a
    layer dominate), held from the first step on. Returns what it pauses."""
    import torch

    generator = torch.Generator().manual_seed(0)
    L, K = controller.mask.shape
    rho = torch.rand(L, K, generator=generator).pow(4).to(controller.mask.device)
    mask = controller.compute_mask(rho)
    controller.set_mask(mask)
    controller.num_steps = 1  # past the first (and only) update
    rows = mask.cpu()
    return {
        "layers": L,
        "subspaces": L * K,
        "paused_subspaces": int((~rows).sum()),
        "wholly_paused_layers": int((~rows).all(1).sum()),
        "partly_paused_layers": int(((~rows).any(1) & rows.any(1)).sum()),
    }


def _timing_worker(methods: list[str], settings: SpeedSettings) -> dict[str, list[float]]:
    """Step times of every method, measured round-robin in one process.

    A shared 2-core machine drifts by several per cent over minutes; timing one method after the other
    puts that drift into the ratios. Here every round times one step of each method, and the order rotates
    from round to round, so each ratio compares steps taken under the same conditions.
    """
    device = _setup(settings)
    steps = {method: _TrainingStep(method, settings, device, settings.cuda_graph) for method in methods}
    for _ in range(settings.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(settings.steps):
        shift = round_ % len(methods)
        for method in methods[shift:] + methods[:shift]:
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
    return times


def _memory_worker(method: str, settings: SpeedSettings) -> dict:
    """Training memory and trainable parameters of one method, in its own process (so the peak is its own)."""
    device = _setup(settings)
    step = _TrainingStep(method, settings, device)
    step()  # the optimizer's state exists from the first step on
    with _PeakMemory(device) as memory:
        step()
    if device.type == "cuda":
        peak_mb = memory.peak_mb
    else:
        peak_mb = _training_memory_mb(step.detector, step.x, step.params, step.optimizer)
    ops, syncs = (None, None) if settings.compile else count_dispatched_ops(step)
    return {
        "peak_mem_mb": peak_mb,
        "trainable": sum(p.numel() for p in step.params),
        "ops_per_step": ops,
        "syncs_per_step": syncs,
        "gflop_per_step": None if settings.compile else count_flops(step) / 1e9,
        **({"mask": step.mask_state} if step.mask_state else {}),
    }


#: ATen operations that make the host wait for the device: a tensor's value read on the host (``.item()``,
#: ``bool()``, ``.tolist()``), a data-dependent shape, a comparison answered on the host.
HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero", "aten.item")


def count_dispatched_ops(fn) -> tuple[int, int]:
    """``(operations, host syncs)`` that ``fn()`` dispatches (views included), counted by a
    ``TorchDispatchMode``.

    Each operation costs host time to dispatch, and each that computes launches at least one kernel on a
    GPU, where a step with small batches is bound by that count rather than by arithmetic. Unlike a time,
    the count does not depend on the machine's load: it shows a change of the GPU path's overhead on any
    machine. A host sync (:data:`HOST_SYNC_OPS`, or a copy from a device to the host) drains the GPU's queue
    of launched kernels; on the CPU it costs nothing, but it is counted all the same: the code is the same.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            if str(func.overloadpacket) in HOST_SYNC_OPS or _copies_to_host(func, args, kwargs or {}):
                self.syncs += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.count, counter.syncs


def count_flops(fn) -> int:
    """Floating-point operations of ``fn()`` (``torch.utils.flop_counter``: matmuls, convolutions and
    attention, 2 per multiply-add; element-wise work is not counted).

    Against a step's time, it tells arithmetic from the rest: a step whose time grows faster than its
    operations pays for memory traffic, small or odd-shaped matmuls, or dispatch. The CPU's flash attention,
    which PyTorch's counter does not know, is counted with its formula for the other attention kernels.
    """
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def _copies_to_host(func, args, kwargs) -> bool:
    """A copy from a device into host memory (``.cpu()``, ``.to("cpu")``, ``copy_`` into a CPU tensor)."""
    import torch

    name = str(func.overloadpacket)
    if name not in ("aten._to_copy", "aten.copy_"):
        return False
    source = args[1] if name == "aten.copy_" else args[0]
    target = args[0].device if name == "aten.copy_" else kwargs.get("device")
    return (
        isinstance(source, torch.Tensor)
        and source.device.type not in ("cpu", "meta")
        and target is not None
        and torch.device(target).type == "cpu"
    )


def _training_memory_mb(detector, x, params, optimizer) -> float:
    """Activations saved for backward + gradients + optimizer state, in MB, counted from the tensors."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        detector(x)
    grads = sum(p.numel() * p.element_size() for p in params)
    state = sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if torch.is_tensor(t)
    )
    return (sum(storages.values()) + grads + state) / 2**20


def _infer_worker(method: str, settings: SpeedSettings) -> dict:
    import torch

    device = _setup(settings)
    plain, _ = _build("linear", settings)
    merged, _ = _build(method, settings)
    merged.merge()
    plain.to(device).eval()
    merged.to(device).eval()
    size = plain.preprocessing.input_size
    x = torch.randn(settings.batch_size, 3, size, size, device=device)
    times = {"plain": [], "merged": []}
    from ..precision import autocast_for

    with torch.inference_mode(), autocast_for(device, settings.precision):
        for i in range(settings.warmup + settings.steps):
            for name, model in (
                (("plain", plain), ("merged", merged))
                if i % 2 == 0
                else (("merged", merged), ("plain", plain))
            ):
                start = time.perf_counter()
                model(x)
                _sync(device)
                if i >= settings.warmup:
                    times[name].append(time.perf_counter() - start)
    return {
        "plain_s": statistics.median(times["plain"]),
        "merged_s": statistics.median(times["merged"]),
        "plain_times_s": times["plain"],
        "merged_times_s": times["merged"],
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak CUDA memory allocated above the level at entry (a no-op on CPU: see the module doc)."""

    def __init__(self, device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        return False


def machine_info() -> dict:
    """Where a benchmark ran: core count, platform, torch version and GPU if any."""
    import platform

    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info

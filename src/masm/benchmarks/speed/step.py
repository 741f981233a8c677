"""One method's training step as the trainer takes it, set up for ``masm bench speed`` to time and measure.

:class:`_TrainingStep` holds a method's detector, the shared random batch, the trainer's optimizer and, for
MASM, its mask held in a steady state (:func:`steady_mask`); calling it takes one step and waits for the
device, so that a wall-clock time around the call is the step's.
"""

from __future__ import annotations

from .methods import SpeedSettings, _build


def _setup(settings: SpeedSettings):
    """The device of ``settings``, with torch's threads, seed and matmul precision set as a worker needs."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    from masm.precision import configure_matmul_precision

    torch.manual_seed(0)
    device = torch.device(settings.device)
    configure_matmul_precision(device)  # what the trainer does: TF32 for whatever runs in fp32 on CUDA
    return device


class _TrainingStep:
    """One method's detector, batch, optimizer and mask controller, and a callable training step."""

    def __init__(self, method: str, settings: SpeedSettings, device, graphed: bool = False):
        import torch

        from masm.training import make_optimizer

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
        from masm.method import layer_groups

        # what the trainer keeps: the MASM layers, grouped by shape for the batched guard and regularisers
        self.groups = layer_groups(self.detector)
        self.controller = None
        self.mask_state = None
        if self.masm_config is not None and self.masm_config.mask.enabled:
            from dataclasses import replace

            from masm.method import SelectiveMaskController

            held = replace(self.masm_config.mask, warmup=0, interval=10**9)  # held as set: no recompute
            self.controller = SelectiveMaskController(self.detector, held)
            self.mask_state = steady_mask(self.controller)
        # cuda_graph: eager steps on a side stream first, then the step captured once and replayed
        self.graphed, self.graph, self.eager_steps = graphed, None, 0

    def __call__(self) -> None:
        from masm.training.cuda_graph import WARMUP, capture_graph, side_stream

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
        from masm.method import subspace_update, total_loss
        from masm.precision import autocast_for
        from masm.training.health import not_finite

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


def _sync(device) -> None:
    """Wait for ``device`` to finish its queued work (CUDA; the CPU has none queued)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)

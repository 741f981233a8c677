"""What a training step costs besides its time: operations dispatched, host syncs, arithmetic, memory.

``masm bench speed`` measures these once per method, in the method's own process. Unlike a time, the
counts do not depend on the machine's load. Training memory on CUDA is the allocator's peak
(:class:`_PeakMemory`); on CPU there is no allocator to ask, so it is counted from the tensors
(:func:`_training_memory_mb`).
"""

from __future__ import annotations

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

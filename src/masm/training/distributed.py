"""One process or many: DDP detected from the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK).

The trainer asks :func:`setup` for a :class:`DistEnv` and never branches on the launcher otherwise: without
a launcher every collective below is the identity. Under ``torchrun`` a process group is joined even with
one process (``--nproc_per_node 1``), so that one GPU runs the multi-GPU code path (DDP, NCCL).

Runs that fail together: an exception on one rank only (a data error, an out-of-memory) would leave the
other ranks waiting in their next collective until the process group's timeout, which is long (the test
sets are scored between two collectives). So the failing rank posts its error in the rendezvous store
(:func:`report_failure`), and a watcher thread on every rank polls that store, independently of the
collective backend: a rank that sees another rank's error prints it and exits at once. Errors that every
rank detects together (a non-finite loss, all-reduced) need none of this and are raised on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, MasmError

logger = logging.getLogger(__name__)

#: Process-group timeout in seconds when the config leaves it unset (``dist_timeout_s: null``).
TIMEOUT_ENV = "MASM_DIST_TIMEOUT_S"
#: Default timeout: the full protocol's test sets take far longer to score than NCCL's 10 minutes.
DEFAULT_TIMEOUT_S = 2 * 3600.0
#: Exit status of a rank stopped because another rank failed (the failing rank exits with it too).
PEER_FAILED_EXIT = 1
#: NCCL's asynchronous error handling, off for a captured step (see :func:`setup`).
ASYNC_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_FAILED_KEY = "masm/failed"
_FAILURES_KEY = "masm/failures"
_POLL_S = 0.5


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this process group was created by setup() and is ours to destroy
    watcher: _PeerFailureWatcher | None = field(default=None, repr=False)
    grouped: bool = False  # in a process group (launched by torchrun), even with world_size 1

    @property
    def distributed(self) -> bool:
        return self.grouped or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        preference = f"cuda:{local_rank}"
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MasmError(f"device {preference!r} requested but CUDA is not available")
    return device


def timeout_seconds(configured: float | None = None) -> float:
    """The process-group timeout: ``configured``, else ``$MASM_DIST_TIMEOUT_S``, else 2 hours."""
    if configured is not None:
        value, source = configured, "dist_timeout_s"
    elif os.environ.get(TIMEOUT_ENV):
        source = f"${TIMEOUT_ENV}"
        try:
            value = float(os.environ[TIMEOUT_ENV])
        except ValueError:
            raise ConfigError(f"{source}: expected seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
    else:
        return DEFAULT_TIMEOUT_S
    if not value > 0:
        raise ConfigError(f"{source}: the process-group timeout must be positive, got {value!r}")
    return float(value)


def setup(device: str = "auto", timeout_s: float | None = None, graph_capture: bool = False) -> DistEnv:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

    ``timeout_s`` bounds every collective (see :func:`timeout_seconds` for the default).
    ``graph_capture``: the training step will be captured as a CUDA graph (``cuda_graph: true``), whose
    collectives NCCL's asynchronous error handling must not watch (PyTorch's recipe for DDP in a graph); it
    is turned off unless ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says otherwise. A rank's failure still
    stops every rank (the watcher below does not rely on NCCL).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _pick_device(device, local_rank)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets both
    if world_size <= 1 and not launched:
        return DistEnv(device=torch_device)
    timeout = timedelta(seconds=timeout_seconds(timeout_s))
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        if graph_capture:  # read when the NCCL process group is made, so set before it
            os.environ.setdefault(ASYNC_ERROR_HANDLING_ENV, "0")
    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        created = True
    env = DistEnv(rank, world_size, local_rank, torch_device, created, grouped=True)
    env.watcher = _PeerFailureWatcher.start_for(rank)
    return env


def cleanup(env: DistEnv, failed: bool = False) -> None:
    """Leave the process group.

    After a success every rank stops its watcher before anyone leaves (the rendezvous store may live in
    rank 0's process). After a failure nothing waits for the other ranks: a graceful destroy can block on
    collectives they will never join, so the group is aborted instead.
    """
    if env.watcher is not None:
        env.watcher.stop()
    if not env.distributed or not dist.is_initialized():
        return
    if failed:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None and env.device.type == "cuda":
            with contextlib.suppress(Exception):
                abort()
        return
    barrier(env)  # every watcher has stopped
    if env.initialized_here:
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


@contextlib.contextmanager
def local_main_first(env: DistEnv):
    """Run the body on each machine's local rank 0 first, then on the other ranks.

    For work whose result the others read from disk instead of redoing it (the SVD cache): the local main
    computes and writes, the others wait at a barrier and then find the files.
    """
    if env.distributed and env.local_rank != 0:
        barrier(env)
    yield
    if env.distributed and env.local_rank == 0:
        barrier(env)


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_true(env: DistEnv, flags: torch.Tensor) -> list[bool]:
    """For each entry of the 1-d tensor ``flags`` (on ``env.device``), whether it is non-zero on any rank.

    One all-reduce and one host sync for all flags; every rank gets the same answer.
    """
    flags = flags.float()
    if env.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [value > 0 for value in flags.tolist()]


def host_group(env: DistEnv):
    """A process group whose collectives run on the host (gloo), for votes that must not touch the
    device's stream (a captured step's ranks agreeing whether to replay); ``None`` without DDP."""
    if not env.distributed:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")  # every rank calls this, in the same order


def all_ranks(env: DistEnv, flag: bool, group) -> bool:
    """Whether ``flag`` holds on every rank (one host-side all-reduce in ``group``, from
    :func:`host_group`; ``flag`` itself without DDP). No device work: nothing waits for the GPU."""
    if not env.distributed:
        return flag
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=group)
    return bool(vote.item())


# -- failing together -------------------------------------------------------------------------------------
def report_failure(env: DistEnv, error: BaseException) -> str | None:
    """Tell the other ranks that this one failed with ``error``.

    Returns the report of another rank that failed first (this rank's error is then most likely a
    consequence, e.g. a collective broken by that rank's exit), else None.
    """
    if not env.distributed or env.watcher is None:
        return None
    env.watcher.reported = True
    message = f"rank {env.rank} failed: {type(error).__name__}: {error}".strip()
    try:
        store = env.watcher.store
        if store.add(_FAILURES_KEY, 1) == 1:
            store.set(_FAILED_KEY, message)
            return None
        return store.get(_FAILED_KEY).decode(errors="replace")
    except Exception as err:  # the store is gone: the launcher sees this rank's exit instead
        logger.warning("could not report the failure to the other ranks: %s", err)
        return None


class _PeerFailureWatcher(threading.Thread):
    """Polls the rendezvous store for another rank's failure; on one, prints it and exits the process.

    The main thread may be inside a collective that cannot be interrupted from Python, so the watcher ends
    the process itself (``os._exit``) after flushing the message: the alternative is waiting for the
    process group's timeout.
    """

    def __init__(self, store: Any, rank: int):
        super().__init__(name="masm-peer-failure-watcher", daemon=True)
        self.store = store
        self.rank = rank
        self.reported = False  # this rank has failed itself: its own error is on its way out
        self._stop_event = threading.Event()

    @classmethod
    def start_for(cls, rank: int) -> _PeerFailureWatcher | None:
        get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
        if get_store is None:
            logger.warning("this torch offers no rendezvous store: a failure on one rank may hang the others")
            return None
        watcher = cls(get_store(), rank)
        watcher.start()
        return watcher

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5 * _POLL_S)

    def run(self) -> None:
        while not self._stop_event.wait(_POLL_S):
            try:
                if not self.store.check([_FAILED_KEY]):
                    continue
                message = self.store.get(_FAILED_KEY).decode(errors="replace")
            except Exception:  # store unreachable: its host exited, the launcher takes it from here
                return
            if self.reported or self._stop_event.is_set():
                return
            sys.stdout.flush()
            sys.stderr.write(f"masm: error: rank {self.rank} stops because {message}\n")
            sys.stderr.flush()
            os._exit(PEER_FAILED_EXIT)

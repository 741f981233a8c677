"""Crops of requests that arrive together scored in one forward pass, on a thread of its own.

A request is *admitted* when it starts (at most ``max_queue`` at once; the next one is told to retry, so
a burst never piles up memory, disk or latency), its upload is decoded into crops on a small pool of
threads, and its crops join the batch queue. The model's thread takes what is queued; while admitted
requests are still on their way to the queue it waits up to the batching window for them (up to
``max_batch`` crops), and when none is, it runs at once: a lone client pays no window.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


class Busy(Exception):
    """Every admission slot is taken; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__("the service is busy")
        self.retry_after = retry_after


@dataclass
class _Group:
    """The crops of one request and where their scores go."""

    crops: list[torch.Tensor]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Task:
    """Work that must not overlap a forward pass (explanation maps hook the model's blocks)."""

    run: Callable[[], object]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatchStats:
    batches: int = 0
    crops: int = 0
    largest: int = 0
    seconds: float = 0.0  # time spent in forward passes


class Batcher:
    """Admission, batching and the model's thread around ``score`` (a batch tensor -> its scores)."""

    def __init__(
        self,
        score: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int,
        window_s: float,
        max_queue: int,
    ):
        self._score = score
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: queue.Queue[_Group | _Task | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # requests between admission and answer
        self._on_the_way = 0  # admitted requests whose crops are not queued yet
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="masm-serve-model", daemon=True)
        self._thread.start()

    # -- admission (event loop) ---------------------------------------------------------------------------

    def admit(self) -> _Admission:
        with self._lock:
            if self._admitted >= self.max_queue:
                raise Busy(retry_after=self._retry_after())
            self._admitted += 1
            self._on_the_way += 1
        return _Admission(self)

    @property
    def admitted(self) -> int:
        return self._admitted

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained: the mean forward time per crop times the requests
        admitted (each has at least one crop); at least 1."""
        if not self.stats.batches:
            return 1
        per_crop = self.stats.seconds / max(1, self.stats.crops)
        return max(1, round(per_crop * self._admitted))

    def _release(self, queued: bool) -> None:
        with self._lock:
            self._admitted -= 1
            if not queued:
                self._on_the_way -= 1

    # -- scoring ------------------------------------------------------------------------------------------

    async def score(self, admission: _Admission, crops: list[torch.Tensor]) -> list[float]:
        """Scores of ``crops`` (one request's), computed in a shared batch; cancellable while waiting."""
        group = _Group(crops)
        self._queue.put(group)  # queued before it stops counting as on its way, so no batch misses it
        with self._lock:
            self._on_the_way -= 1
            admission.queued = True
        return await asyncio.wrap_future(group.future)

    async def run_exclusive(self, fn: Callable[[], object]) -> object:
        """``fn()`` on the model's thread, between batches (for work that hooks into the model)."""
        task = _Task(fn)
        self._queue.put(task)
        return await asyncio.wrap_future(task.future)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- the model's thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if isinstance(first, _Task):
                self._run_task(first)
                continue
            groups, after = self._collect(first)
            self._score_groups(groups)
            if after is not None:
                self._run_task(after)
            if self._stopping:
                return

    def _collect(self, first: _Group) -> tuple[list[_Group], _Task | None]:
        """``first`` and what joins it within the window; a task met on the way runs after the batch."""
        groups = [first]
        crops = len(first.crops)
        deadline = time.monotonic() + self.window_s
        while crops < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._on_the_way == 0:
                    break  # nothing else is coming: waiting would only add latency
                try:
                    item = self._queue.get(timeout=min(remaining, 0.002))
                except queue.Empty:
                    continue
            if item is None:
                self._stopping = True
                break
            if isinstance(item, _Task):
                return groups, item
            groups.append(item)
            crops += len(item.crops)
        return groups, None

    def _run_task(self, task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            task.future.set_result(task.run())
        except Exception as err:  # reported to the request that asked, never ends the thread
            task.future.set_exception(err)

    def _score_groups(self, groups: list[_Group]) -> None:
        # A request that timed out or went away while queued is cancelled: its crops are not scored.
        live = [g for g in groups if g.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            crops = [crop for g in live for crop in g.crops]
            start = time.perf_counter()
            scores: list[float] = []
            for i in range(0, len(crops), self.max_batch):
                scores.extend(self._score(torch.stack(crops[i : i + self.max_batch])).tolist())
            self.stats.seconds += time.perf_counter() - start
            self.stats.batches += 1
            self.stats.crops += len(crops)
            self.stats.largest = max(self.stats.largest, len(crops))
        except Exception as err:  # the model failing must fail these requests, never the thread
            log.exception("scoring a batch of %d requests failed", len(live))
            for g in live:
                g.future.set_exception(err)
            return
        offset = 0
        for g in live:
            g.future.set_result(scores[offset : offset + len(g.crops)])
            offset += len(g.crops)


class _Admission:
    """One admitted request; leaving the ``with`` block frees its slot."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.queued = False

    def __enter__(self) -> _Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.batcher._release(self.queued)

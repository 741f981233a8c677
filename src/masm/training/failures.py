"""Training samples that failed to load or to forge: skipped, logged with their path, counted over ranks.

One bad file must never stop a long run, but a broken data set must: above ``data.max_failed_share`` the
run stops and names the first files. The counts are global (summed over ranks by the loop's one
all-reduce per step) and part of the checkpoint, so they survive a resume.
"""

from __future__ import annotations

import logging

from ..errors import DataError

logger = logging.getLogger(__name__)

#: How many failed samples a rank remembers (path and error) to name them when the run stops.
REMEMBERED = 10


class FailureLedger:
    """Failed and seen training samples: this rank's since the last step, and the run's totals."""

    def __init__(self, max_share: float, samples_per_epoch: int):
        self.max_share = max_share
        self.samples_per_epoch = samples_per_epoch  # over all ranks
        self.failed = 0  # run totals over all ranks (updated once per optimizer step)
        self.seen = 0
        self.pending_failed = 0  # this rank, since the last step
        self.pending_ok = 0
        self.first: list[tuple[str, str]] = []  # this rank's first failures

    def add_batch(self, failed: list[tuple[str, str]], ok: int) -> None:
        for path, error in failed:
            logger.warning("skipped training sample %s: %s", path, error)
            if len(self.first) < REMEMBERED:
                self.first.append((path, error))
        self.pending_failed += len(failed)
        self.pending_ok += ok

    def take_pending(self) -> tuple[int, int]:
        """This rank's (ok, failed) samples since the last step, for the step's all-reduce."""
        pending = (self.pending_ok, self.pending_failed)
        self.pending_ok = self.pending_failed = 0
        return pending

    def add_step(self, ok: int, failed: int) -> None:
        """Count a step's samples over all ranks."""
        self.failed += failed
        self.seen += ok + failed

    def exceeded(self) -> bool:
        """More failures than the share allows: of an epoch's samples until one epoch is seen, then of all
        seen. The epoch floor keeps one early bad file from stopping a run whose data is fine."""
        return self.failed > self.max_share * max(self.seen, self.samples_per_epoch)

    def error(self, first_failures: list[tuple[str, str]]) -> DataError:
        names = "; ".join(f"{path} ({error})" for path, error in first_failures[:3])
        return DataError(
            f"{self.failed} of {self.seen} training samples failed to load or forge, more than "
            f"data.max_failed_share={self.max_share:g} allows: the data set, not a file, is broken. "
            f"First: {names}"
        )

    def state(self) -> dict[str, int]:
        return {"failed": self.failed, "seen": self.seen}

    def load_state(self, state: dict[str, int] | None) -> None:
        state = state or {}
        self.failed, self.seen = int(state.get("failed", 0)), int(state.get("seen", 0))

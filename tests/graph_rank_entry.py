"""``masm train`` in one rank of a ``torchrun`` launch, with the captured step's body run eagerly (as in
``tests/test_cuda_graph.py``; the capture itself needs CUDA), recording on each rank which steps it took as
the graph's and at which its own batch could not have been: ``graph_steps_rank{RANK}.json`` in
``$MASM_TEST_GRAPH_RECORD``. Used by ``tests/test_cuda_graph_ddp.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from masm.training import cuda_graph


class _Recorder(cuda_graph.CapturedStep):
    def __init__(self, run):
        super().__init__(run, capture=False)
        self.graph_steps: list[int] = []
        self.unfit_steps: list[int] = []  # this rank's batch alone could not have been the graph's

    def _fits(self, run, batch):
        fits = super()._fits(run, batch)
        if not fits:
            self.unfit_steps.append(run.progress.global_step + 1)
        return fits

    def step(self, run, batch):
        self.graph_steps.append(run.progress.global_step + 1)
        return super().step(run, batch)


def main() -> int:
    made: list[_Recorder] = []

    def record(run):
        made.append(_Recorder(run))
        return made[-1]

    cuda_graph.make_captured_step = record
    from masm.cli.main import main as masm_main

    status = masm_main(sys.argv[1:])
    for recorder in made:  # none with cuda_graph: false
        folder = Path(os.environ["MASM_TEST_GRAPH_RECORD"])
        folder.mkdir(parents=True, exist_ok=True)
        steps = {"graph_steps": recorder.graph_steps, "unfit_steps": recorder.unfit_steps}
        (folder / f"graph_steps_rank{os.environ['RANK']}.json").write_text(json.dumps(steps))
    return status


if __name__ == "__main__":
    sys.exit(main())

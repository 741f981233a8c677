"""Fault injection: a run killed (SIGKILL) at many moments, inside checkpoint writes too, then resumed, ends
with the weights of an uninterrupted run; a folder of corrupt frames and donors trains, or stops by rule.

Each killed run is a forked child of the test process (no interpreter start-up per kill): the child arms
one trigger, trains, and kills itself with SIGKILL when the trigger fires, exactly as a scheduler or the
OOM killer would, with no chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masm.errors import DataError
from masm.models import checkpoint as checkpoint_module
from masm.training import checkpoints as checkpoints_module
from masm.training import load_train_config, train
from masm.training import trainer as trainer_module
from masm.training import validation as validation_module
from test_train_support import TINY_CONFIG, make_folder_dataset, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

# 12 frames, batch 4: 3 steps an epoch, 2 epochs; `last` every 2 steps and at epoch ends; validation
# (and `best`) every epoch. Every kind of state crosses the kills: cosine schedule, clipping, the mask.
OVERRIDES = {
    "epochs": 2,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 1,
    "optim.max_grad_norm": 1.0,
    "checkpoint_every": 2,
    "model.method.masm.mask.warmup": 1,
    "model.method.masm.mask.interval": 1,
}
TOTAL_STEPS = 6


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    """Fires the kill at the n-th call of a wrapped function (before it runs, or after with ``after``)."""

    def __init__(self, real, n: int, after: bool = False, truncate: bool = False):
        self.real, self.n, self.after, self.truncate, self.calls = real, n, after, truncate, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n and not (self.after or self.truncate):
            _kill()
        result = self.real(*args, **kwargs)
        if self.calls == self.n and self.truncate:  # a data file half written when the process died
            path = Path(args[1])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            _kill()
        if self.calls == self.n and self.after:
            _kill()
        return result


def _arm(moment: tuple) -> dict:
    """Install the trigger of ``moment`` in this (child) process; returns train() keyword arguments."""
    kind, n = moment[0], moment[1]
    if kind == "step":
        return {"on_step": lambda progress: _kill() if progress.global_step == n else None}
    if kind == "save_file":  # a checkpoint's data file, cut half-way through
        checkpoint_module.save_file = _Counter(checkpoint_module.save_file, n, truncate=True)
    elif kind == "replace":  # before the n-th rename of a checkpoint switch (between the two renames, too)
        checkpoint_module.os.replace = _Counter(checkpoint_module.os.replace, n)
    elif kind == "fsync_dir":  # after the switch's renames, before the old copy is removed
        checkpoint_module._fsync_dir = _Counter(checkpoint_module._fsync_dir, n, after=True)
    elif kind == "fsync_file":  # a file of the checkpoint written, before it is synced
        checkpoint_module._fsync_file = _Counter(checkpoint_module._fsync_file, n)
    elif kind == "validate":  # in the middle of a validation
        counter = _Counter(validation_module.Selection.score, n)
        validation_module.Selection.score = lambda self, *args: counter(self, *args)
    return {}


def _record_saves_and_resume_point(run: Path) -> None:
    """In a child: log each completed ``last`` save's step, and the step a run starts its loop from."""
    save = checkpoints_module.save_checkpoint
    fit = trainer_module.fit

    def recording_save(detector, directory, **kwargs):
        result = save(detector, directory, **kwargs)
        if kwargs["info"]["kind"] == "last":
            with (run / "saved_steps").open("a") as fh:
                fh.write(f"{kwargs['info']['global_step']}\n")
        return result

    def recording_fit(state):
        (run / "started_at").write_text(str(state.progress.global_step))
        return fit(state)

    checkpoints_module.save_checkpoint = recording_save
    trainer_module.fit = recording_fit


def _in_child(job) -> int:
    """Run ``job()`` in a forked child; its exit status, or -signal when a signal ended it."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            torch.set_num_threads(1)
            job()
        except BaseException:
            traceback.print_exc()
            status = 3
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _weights(run: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors"))


MOMENTS = (
    [("step", k) for k in range(1, TOTAL_STEPS + 1)]
    + [("save_file", n) for n in (1, 2, 4, 7)]
    + [("replace", n) for n in (1, 2, 3, 4, 5, 7)]
    + [("fsync_dir", n) for n in (1, 3)]
    + [("fsync_file", n) for n in (3, 9)]
    + [("validate", n) for n in (1, 2)]
)


def test_killed_anywhere_the_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    assert len(set(MOMENTS)) >= 20 and sum(m[0] not in ("step", "validate") for m in MOMENTS) >= 5
    data = make_folder_dataset(tmp_path / "fx")
    config = load_train_config(TINY_CONFIG, tiny_overrides(data, **OVERRIDES))
    reference = tmp_path / "reference"
    assert train(config, reference, progress=False).global_step == TOTAL_STEPS
    killed = []
    for i, moment in enumerate(MOMENTS):
        run = tmp_path / f"run{i}"

        def killed_run(run=run, moment=moment):
            _record_saves_and_resume_point(run)
            train(config, run, progress=False, **_arm(moment))

        def resumed_run(run=run, resume=True):
            _record_saves_and_resume_point(run)
            train(config, run, resume=resume, progress=False)

        status = _in_child(killed_run)
        killed.append(status == -signal.SIGKILL)
        assert status in (0, -signal.SIGKILL), f"{moment}: the run failed instead of being killed"
        # killed before the run saved its config there is nothing to resume: the user starts it afresh
        resume = (run / "config.yaml").is_file()
        log = run / "saved_steps"
        saved = [int(x) for x in log.read_text().split()] if log.is_file() else []
        status = _in_child(lambda resume=resume: resumed_run(resume=resume))
        assert status == 0, f"{moment}: the {'resume' if resume else 'new start'} failed"
        # no progress lost: the run continued from the newest checkpoint that was complete when it died
        started = int((run / "started_at").read_text())
        assert started >= max(saved, default=0), f"{moment}: saved {saved}, resumed at {started}"
        for which in ("last", "best"):
            a, b = _weights(reference, which), _weights(run, which)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(
                    b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, k=key, at=moment: f"{at} {k}: {m}"
                )
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps), moment
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name not in ("last", "best")]
        assert not leftovers, f"{moment}: {leftovers}"
    assert all(killed), [m for m, k in zip(MOMENTS, killed) if not k]  # every trigger fired


def _failed_samples(config, data: Path, epoch: int) -> list[str]:
    """The errors of an epoch's training samples, read straight from the data set (not from the loop)."""
    from masm.data.spec import open_dataset
    from masm.models.preprocessing import Preprocessing
    from masm.training.data import build_train_loader

    records = open_dataset(f"folder:{data}", frames_per_video=config.data.frames_train).records
    plan = build_train_loader(config, records, Preprocessing(input_size=32), 0, 1, torch.device("cpu"))
    plan.frames.set_epoch(epoch)
    return [e for e in (plan.frames[i]["error"] for i in range(len(records))) if e]


def test_corrupt_frames_and_a_corrupt_donor_are_skipped_and_counted_or_stop_the_run_by_rule(tmp_path):
    # 60 frames, 3 of them corrupt (5 %): two fakes, and a real frame that also serves as a splice donor
    data = make_folder_dataset(tmp_path / "fx", n_real=30, n_fake=27)
    for name in ("real/corrupt.png", "fake/fam1/corrupt1.png", "fake/fam2/corrupt2.png"):
        (data / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    base = {
        "epochs": 1,
        "data.val": "none",
        "data.pseudo_fakes.probability": 1.0,
        "data.pseudo_fakes.families": "[splice]",
        "data.pseudo_fakes.region": "random",
    }
    tolerant = load_train_config(TINY_CONFIG, tiny_overrides(data, **base, **{"data.max_failed_share": 0.1}))
    expected = _failed_samples(tolerant, data, epoch=0)
    assert any("pseudo-fake of" in e and "corrupt.png" in e for e in expected)  # a sample drew the donor
    result = train(tolerant, tmp_path / "tolerant", progress=False)
    assert result.global_step == 15 and result.frames_failed == len(expected) >= 4
    records = [json.loads(x) for x in (tmp_path / "tolerant" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["frames_failed"] == len(expected)
    strict = load_train_config(TINY_CONFIG, tiny_overrides(data, **base))  # the default limit, 1 %
    with pytest.raises(DataError, match=r"failed to load or forge.*max_failed_share=0.01.*First: .*corrupt"):
        train(strict, tmp_path / "strict", progress=False)


def test_a_corrupt_donor_fails_its_sample_naming_both_files(tmp_path):
    from masm.data.spec import open_dataset
    from masm.data.transforms import build_transform
    from masm.models.preprocessing import Preprocessing
    from masm.training.data import LazyImages, TrainFrames

    data = make_folder_dataset(tmp_path / "fx", n_real=3, n_fake=0, only_real=True)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    overrides = {"data.pseudo_fakes.probability": 1.0, "data.pseudo_fakes.families": "[splice]"}
    config = load_train_config(TINY_CONFIG, tiny_overrides(data, **overrides))
    records = open_dataset(f"folder:{data}").records
    transform = build_transform(Preprocessing(input_size=32), train=False)
    frames = TrainFrames(records, transform, 0, config.data.pseudo_fakes)
    frames.pseudo_fakes.donors = LazyImages([str(corrupt)])  # every splice draws the corrupt donor
    samples = [frames[i] for i in range(len(records))]
    for record, sample in zip(records, samples):
        assert sample["pixel_values"] is None
        assert f"pseudo-fake of {record.path} failed" in sample["error"] and "corrupt.png" in sample["error"]

"""What a detector's scores mean and where it decides: the calibration stored with a checkpoint.

A detector's raw score is ``P(fake) = sigmoid(z)`` with ``z`` its log-odds of "fake" (the difference of its
two logits, or its one logit). :class:`Calibration` holds

- a temperature ``T`` (Guo et al. 2017): the calibrated score is ``sigmoid(z / T)``; it changes what a score
  *means* (0.8 is fake about four times in five on the calibration data), never the order of scores, so AUC
  is unchanged;
- named operating points (``fpr=0.01``, ``fpr=0.001``, ``eer``), each a threshold on the calibrated score
  chosen on labelled data, at frame level (an image, a frame) and, for video data, at video level (the mean
  of a video's calibrated frame scores), with the false- and true-positive rates it had there and the
  number of reals and fakes it rests on;
- which of them a deployment uses by default.

It is written into the checkpoint's ``config.json`` (key ``calibration``) without touching the weights;
a checkpoint without it loads as before and decides at 0.5 on the raw score. Fitting lives in
:mod:`masm.evaluation.calibration`; this module only stores and applies.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError, MasmError

#: Levels an operating point can be chosen at: one crop/frame/image, or a video (mean of frame scores).
LEVELS = ("frame", "video")

#: Threshold used when a detector has no stored operating point.
UNCALIBRATED_THRESHOLD = 0.5

_FPR_NAME = re.compile(r"^fpr=(0?\.\d+|1e-\d+|\d\.\d*e-\d+)$")


def parse_operating_point(name: str) -> tuple[str, float | None]:
    """``"fpr=0.01"`` -> ``("fpr", 0.01)``, ``"eer"`` -> ``("eer", None)``; anything else is an error."""
    text = name.strip().lower()
    if text == "eer":
        return "eer", None
    match = _FPR_NAME.match(text)
    if match:
        target = float(match.group(1))
        if 0.0 < target < 1.0:
            return "fpr", target
    raise MasmError(f"unknown operating point {name!r}: use 'fpr=<rate>' (e.g. fpr=0.01) or 'eer'")


def canonical_operating_point(name: str) -> str:
    """The one spelling an operating point is stored under (``fpr=0.010`` -> ``fpr=0.01``)."""
    kind, target = parse_operating_point(name)
    return "eer" if kind == "eer" else f"fpr={target:g}"


@dataclass
class OperatingPoint:
    """A threshold on the calibrated score (``score >= threshold`` is labelled fake) and what it gave on the
    data it was chosen on."""

    name: str
    level: str
    threshold: float
    fpr: float
    tpr: float
    n_real: int
    n_fake: int
    #: one-sided 95 % upper bound of the false-positive rate (Clopper-Pearson), from ``n_real`` reals
    fpr_upper95: float | None = None
    data: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise MasmError(
                f"operating point {self.name!r}: level must be one of {LEVELS}, got {self.level!r}"
            )


@dataclass
class Calibration:
    """Temperature and operating points of a detector (see the module docstring)."""

    temperature: float = 1.0
    operating_points: list[OperatingPoint] = field(default_factory=list)
    #: the operating point used when none is asked for (``None``: decide at 0.5)
    default: str | None = None
    #: where it was fitted (data spec / split name) and on how many frames
    fitted_on: str = ""
    n_real: int = 0
    n_fake: int = 0
    #: ECE and Brier score on the fitting data, before and after temperature scaling
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise MasmError(f"calibration temperature must be a positive number, got {self.temperature!r}")

    # -- applying -----------------------------------------------------------------------------------------

    def score(self, log_odds: float) -> float:
        """Calibrated P(fake) of one log-odds value (numerically stable for any magnitude)."""
        return sigmoid(log_odds / self.temperature)

    def point(self, name: str, level: str = "frame") -> OperatingPoint | None:
        """The stored operating point ``name`` at ``level``, or None."""
        wanted = canonical_operating_point(name)
        for op in self.operating_points:
            if op.name == wanted and op.level == level:
                return op
        return None

    def names(self) -> list[str]:
        return sorted({op.name for op in self.operating_points})

    # -- storing ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "calibration") -> Calibration:
        """Rebuild from :meth:`to_dict`'s form; a malformed record is an error naming ``where``."""
        try:
            points = [OperatingPoint(**op) for op in data.get("operating_points", [])]
            fields = {k: v for k, v in data.items() if k != "operating_points"}
            return cls(operating_points=points, **fields)
        except (TypeError, AttributeError) as err:
            raise CheckpointError(f"{where}: malformed calibration record ({err})") from None


@dataclass(frozen=True)
class Decision:
    """How a score becomes a label: the threshold, at which level, and what it is called in outputs."""

    threshold: float
    name: str  # "fpr=0.01", or "threshold=0.5" for a plain number
    level: str = "frame"
    note: str | None = None

    def label(self, score: float) -> str:
        return "fake" if score >= self.threshold else "real"

    def describe(self) -> dict[str, Any]:
        """The operating point as outputs name it (JSON line, service answer)."""
        described = {"name": self.name, "threshold": self.threshold, "level": self.level}
        return described if self.note is None else {**described, "note": self.note}


def resolve_decisions(
    calibration: Calibration | None, operating_point: str | None = None, threshold: float | None = None
) -> dict[str, Decision]:
    """``{"frame": Decision, "video": Decision}`` a scorer labels with.

    ``threshold`` (a number) wins over everything; else ``operating_point`` (e.g. ``"fpr=0.01"``), which
    must be stored; else the calibration's default; else 0.5 with a note that none is stored. A video uses
    the video-level point when one is stored, else the frame-level one (and says so).
    """
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise MasmError(f"threshold must be in [0, 1], got {threshold}")
        plain = Decision(float(threshold), f"threshold={threshold:g}")
        return {"frame": plain, "video": Decision(plain.threshold, plain.name, "video")}
    name = operating_point or (calibration.default if calibration else None)
    if name is None:
        note = "no operating point stored with this detector: labelled at 0.5 (run masm calibrate)"
        plain = Decision(UNCALIBRATED_THRESHOLD, f"threshold={UNCALIBRATED_THRESHOLD:g}", note=note)
        return {"frame": plain, "video": Decision(plain.threshold, plain.name, "video", note)}
    stored = calibration.names() if calibration else []
    frame = calibration.point(name, "frame") if calibration else None
    if frame is None:
        known = ", ".join(stored) or "none"
        raise MasmError(f"operating point {name!r} is not stored with this detector (stored: {known})")
    video = calibration.point(name, "video")
    frame_decision = Decision(frame.threshold, frame.name, "frame")
    if video is None:
        note = f"no video-level {frame.name} stored: videos labelled at the frame-level threshold"
        return {"frame": frame_decision, "video": Decision(frame.threshold, frame.name, "frame", note)}
    return {"frame": frame_decision, "video": Decision(video.threshold, video.name, "video")}


def log_odds_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Log-odds of "fake" from a head's logits: ``l_fake - l_real`` for two logits (softmax), the logit
    itself for one (sigmoid), in float32 at least."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0] if logits.shape[-1] == 2 else logits[:, 0]


def sigmoid(x: float) -> float:
    """Logistic function without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)

"""Score images and videos with a detector: faces found and aligned as in training, crops batched.

:class:`Scorer` turns paths into one result dict per input (see :data:`RESULT_KEYS`). Face crops of many
inputs share a batch, and the model is merged (adapters folded into plain Linears), so the forward pass
costs exactly what the plain backbone costs. A bad input gets ``error`` set and the run goes on. A
whole-image detector (no ``face_crop``) looks for no face; its preprocessing says whether an image is
resized, centre-cropped or cut into tiles (:mod:`masm.data.whole_image`), and a tiled image is still one
result.

With ``explain_dir`` set, every batch is scored by :func:`masm.explain.make_explainer`'s explainer
instead (the same forward, plus one backward) and every image and scored video frame gets its explanation
map, carried back onto the original frame through the crop's matrix (:mod:`masm.explain.geometry`);
without it no hook is installed and nothing else runs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from masm.data.images import DEFAULT_MAX_PIXELS, load_rgb
from masm.data.whole_image import combine_tile_log_odds
from masm.errors import MasmError
from masm.models import Detector, load_checkpoint
from masm.models.calibration import log_odds_of_logits, resolve_decisions, sigmoid

from .inputs import IMAGE, Input, expand_inputs

log = logging.getLogger(__name__)

# Keys of every result, in output order; per-frame scores add ``frame_scores``. ``score`` is the calibrated
# P(fake) (the raw one when the detector stores no calibration), ``raw_score`` the network's own, ``label``
# the decision at ``operating_point`` (its name, threshold and level).
RESULT_KEYS = (
    "input",
    "kind",
    "score",
    "raw_score",
    "label",
    "operating_point",
    "faces",
    "frames",
    "error",
    "note",
)

# Smaller images are refused: upscaling a few pixels to the model's input gives a number without meaning.
MIN_IMAGE_SIDE = 16


@dataclass
class ScorerOptions:
    """How inputs are turned into model inputs and scores."""

    batch_size: int = field(default=32, metadata={"help": "crops per forward pass (across inputs)"})
    frames: int = field(default=32, metadata={"help": "evenly spaced frames per video (0: all)"})
    faces: bool = field(
        default=True, metadata={"help": "detect and align faces (if the model was trained so)"}
    )
    operating_point: str | None = field(
        default=None,
        metadata={"help": "stored operating point to label at (fpr=0.01, eer; default: the detector's own)"},
    )
    threshold: float | None = field(
        default=None, metadata={"help": "label fake at score >= this number instead of an operating point"}
    )
    per_frame: bool = field(default=False, metadata={"help": "add per-frame scores to video results"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "larger images are refused"})
    min_side: int = field(default=MIN_IMAGE_SIDE, metadata={"help": "smaller images are refused"})
    detect_width: int = field(default=640, metadata={"help": "width frames are scaled to for face detection"})
    explain_dir: str | None = field(
        default=None, metadata={"help": "write explanation maps (PNG overlays, video contact sheets) here"}
    )

    def validate(self) -> None:
        threshold_ok = self.threshold is None or 0.0 <= self.threshold <= 1.0
        if self.batch_size < 1 or self.frames < 0 or not threshold_ok:
            raise MasmError(
                f"batch size must be >= 1, frames >= 0 and threshold in [0, 1] "
                f"(got {self.batch_size}, {self.frames}, {self.threshold})"
            )


@dataclass
class _Job:
    """One input on its way through the scorer: its crops wait in the batch queue until scored."""

    result: dict
    crop_frames: list[int] = field(default_factory=list)  # frame slot of each crop
    crop_images: list[int] = field(default_factory=list)  # which face (or whole frame) each crop is from
    scores: list[float | None] = field(default_factory=list)  # log-odds of "fake" of each crop
    frame_ids: list[int] = field(default_factory=list)  # video frame index per frame slot
    faces_per_frame: list[int] = field(default_factory=list)
    number: int = 0  # position among the inputs (names explanation files)
    # With explanations only: each crop's frame -> model-input matrix and map, each frame slot's image.
    matrices: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray | None] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(s is not None for s in self.scores)


class Scorer:
    """Scores images and videos with a detector or a checkpoint directory.

    >>> scorer = Scorer("runs/ffpp/best")            # doctest: +SKIP
    >>> for result in scorer.score_paths(["photo.jpg", "clip.mp4", "folder/"]):  # doctest: +SKIP
    ...     print(result["input"], result["score"], result["label"])

    ``merge=True`` (default) runs the merged model; a :class:`Detector` passed in is copied first, never
    changed. Face detection runs when ``options.faces`` is set and the model's preprocessing has a
    ``face_crop`` (its size and scale are used, so crops match what the model was trained on).
    """

    def __init__(
        self,
        model: Detector | str | Path,
        options: ScorerOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        merge: bool = True,
    ):
        self.options = options or ScorerOptions()
        self.options.validate()
        self.device = torch.device(device)
        if isinstance(model, Detector):
            if merge and not model.merged:
                model = copy.deepcopy(model).merge()
            self.model = model.to(self.device).eval()
        else:
            self.model = load_checkpoint(model, device=self.device, merge=merge)
        from masm.data.transforms import build_transform

        self.calibration = self.model.calibration
        self.decisions = resolve_decisions(
            self.calibration, self.options.operating_point, self.options.threshold
        )
        self.preprocessing = self.model.preprocessing
        self.transform = build_transform(self.preprocessing, train=False)
        face_crop = self.preprocessing.face_crop
        self.aligner = None
        if self.options.faces and face_crop is not None:
            from masm.data.faces import FaceAligner

            self.aligner = FaceAligner(face_crop.size, face_crop.scale, self.options.detect_width)
            self.aligner.detect(np.zeros((8, 8, 3), np.uint8))  # fail now (MasmError) if dlib is missing
        self.explainer = None
        if self.options.explain_dir is not None:
            from masm.explain import make_explainer

            self.explainer = make_explainer(self.model)
        self._count = 0

    # -- public API ---------------------------------------------------------------------------------------

    def score_paths(self, paths: Iterable[str]) -> Iterator[dict]:
        """One result per input named by ``paths`` (files, folders, ``-`` for stdin), in order."""
        return self.score_inputs(expand_inputs(paths))

    def score_inputs(self, inputs: Iterable[Input]) -> Iterator[dict]:
        """One result per :class:`Input`; crops of consecutive inputs are scored in shared batches."""
        pending: deque[_Job] = deque()
        queue: list[tuple[_Job, int, torch.Tensor]] = []
        for item in inputs:
            job, crops = self._prepare(item)
            pending.append(job)
            queue.extend((job, slot, crop) for slot, crop in enumerate(crops))
            while len(queue) >= self.options.batch_size:
                self._run_batch(queue[: self.options.batch_size])
                del queue[: self.options.batch_size]
            while pending and pending[0].done:
                yield self._finish(pending.popleft())
        if queue:
            self._run_batch(queue)
        while pending:
            yield self._finish(pending.popleft())

    def prepare(self, item: Input) -> tuple[_Job, list[torch.Tensor]]:
        """Decode one input into its model inputs, for callers that batch crops of many inputs themselves
        (``masm serve``): score the crops with :meth:`score_tensor`, then hand their scores to :meth:`finish`.
        A bad input comes back with ``error`` set in its result and no crops."""
        return self._prepare(item)

    def finish(self, job: _Job, log_odds: list[float]) -> dict:
        """The result of a prepared input, given the log-odds of its crops in order
        (:meth:`log_odds_tensor`)."""
        job.scores = [float(s) for s in log_odds]
        return self._finish(job)

    @torch.no_grad()
    def log_odds_tensor(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Log-odds of "fake" (float64) for a batch of preprocessed inputs (N, 3, S, S): what the scorer
        batches; scores are made from them, so calibration loses nothing to a saturated float32 P(fake)."""
        return log_odds_of_logits(self.model(pixel_values.to(self.device))).cpu().double()

    def calibrated_score(self, log_odds: float) -> float:
        """The calibrated P(fake) of one crop's log-odds (the raw P(fake) without a stored calibration)."""
        return sigmoid(log_odds / (self.calibration.temperature if self.calibration else 1.0))

    def score_tensor(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Calibrated P(fake) (float64) for a batch of preprocessed inputs (N, 3, S, S)."""
        log_odds = self.log_odds_tensor(pixel_values)
        return torch.sigmoid(log_odds / (self.calibration.temperature if self.calibration else 1.0))

    # -- preparation: files -> crops ----------------------------------------------------------------------

    def _prepare(self, item: Input) -> tuple[_Job, list[torch.Tensor]]:
        result = dict.fromkeys(RESULT_KEYS)
        result.update(input=item.path, kind=item.kind)
        job = _Job(result, number=self._count)
        self._count += 1
        if item.error is not None:
            result["error"] = item.error
            return job, []
        try:
            if item.kind == IMAGE:
                frames = [(0, self._load_image(item.path))]
            else:
                from masm.data.video import read_frames

                frames = read_frames(item.path, self.options.frames)
            crops = self._crops(job, frames)
        except MasmError as err:
            result["error"] = str(err)
            return job, []
        except Exception as err:  # a decoder or detector failing on odd content must not end the run
            log.debug("%s: unexpected failure", item.path, exc_info=True)
            result["error"] = f"{item.path}: cannot process ({type(err).__name__}: {err})"
            return job, []
        job.scores = [None] * len(crops)
        job.maps = [None] * len(crops)
        return job, crops

    def _load_image(self, path: str) -> np.ndarray:
        rgb = load_rgb(path, max_pixels=self.options.max_pixels)
        height, width = rgb.shape[:2]
        if min(height, width) < self.options.min_side:
            raise MasmError(
                f"{path}: image of {width}x{height} pixels is too small to score "
                f"(at least {self.options.min_side} pixels a side)"
            )
        return rgb

    def _crops(self, job: _Job, frames: list[tuple[int, np.ndarray]]) -> list[torch.Tensor]:
        """Face crops of every frame (all faces of an image, the largest face of a video frame).

        Frames without a face are left out when other frames have one; when no frame has a face the whole
        frames are scored and the result's note says so.
        """
        is_image = job.result["kind"] == IMAGE
        per_frame: list[list[np.ndarray]] = []
        per_frame_matrices: list[list[np.ndarray]] = []  # frame -> face crop, per face
        for _, rgb in frames:
            if self.aligner is None:
                per_frame.append([])
                per_frame_matrices.append([])
                continue
            faces = self.aligner.detect(rgb)
            if not is_image:
                faces = faces[:1]  # the protocol's choice for videos: the largest face
            per_frame.append([self.aligner.align(rgb, face) for face in faces])
            per_frame_matrices.append([self.aligner.transform_for(face) for face in faces])
        total_faces = sum(len(c) for c in per_frame)
        job.result["faces"] = total_faces if self.aligner is not None else None  # None: not looked for
        if self.aligner is not None and total_faces == 0:
            where = "the image was" if is_image else "whole frames were"
            job.result["note"] = f"no face found; {where} scored"
        crops: list[torch.Tensor] = []
        for (index, rgb), faces, matrices in zip(frames, per_frame, per_frame_matrices):
            if total_faces and not faces:
                continue
            slot = len(job.frame_ids)
            job.frame_ids.append(index)
            job.faces_per_frame.append(len(faces))
            for image in faces or [rgb]:
                pixels = self.transform(image)
                image_crops = list(pixels) if self.transform.tiled else [pixels]  # tiles: several
                job.crop_frames += [slot] * len(image_crops)
                job.crop_images += [job.crop_images[-1] + 1 if job.crop_images else 0] * len(image_crops)
                crops += image_crops
            if self.explainer is not None:
                job.frames.append(rgb)
                job.matrices += self._crop_matrices(rgb, matrices)
        job.result["frames"] = len(job.frame_ids)
        if not is_image and total_faces and len(job.frame_ids) < len(frames):
            job.result["note"] = f"{len(frames) - len(job.frame_ids)} of {len(frames)} frames had no face"
        return crops

    def _crop_matrices(self, rgb: np.ndarray, face_matrices: list[np.ndarray]) -> list[np.ndarray]:
        """Frame pixels -> model input pixels for each crop of a frame (its faces, else the whole frame)."""
        from masm.explain.geometry import compose

        if not face_matrices:
            return self._input_matrices(rgb.shape[0], rgb.shape[1])
        crop = self.aligner.crop_size
        return [compose(inner, m) for m in face_matrices for inner in self._input_matrices(crop, crop)]

    def _input_matrices(self, height: int, width: int) -> list[np.ndarray]:
        """Image pixels -> model input pixels of each input the transform makes of an image."""
        from masm.explain.geometry import transform_matrices

        return transform_matrices(self.transform, height, width)

    # -- scoring and results ------------------------------------------------------------------------------

    def _run_batch(self, entries: list[tuple[_Job, int, torch.Tensor]]) -> None:
        batch = torch.stack([crop for _, _, crop in entries])
        if self.explainer is None:
            scores = self.log_odds_tensor(batch).tolist()
        else:
            explained = self.explainer(batch.to(self.device))
            scores = explained.log_odds.cpu().double().tolist()
            for (job, slot, _), map_ in zip(entries, explained.maps.cpu().numpy()):
                job.maps[slot] = map_
        for (job, slot, _), score in zip(entries, scores):
            job.scores[slot] = float(score)

    def _finish(self, job: _Job) -> dict:
        result = job.result
        if result["error"] is not None:
            return result
        # An image scores as its most suspicious face; a video as the mean over frames of its frame score;
        # an image cut into tiles as its tiles' combined score (combine_tile_log_odds says why).
        per_image: dict[int, list[float]] = {}
        for score, image in zip(job.scores, job.crop_images):
            per_image.setdefault(image, []).append(score)
        frame_log_odds = [-math.inf] * len(job.frame_ids)
        for image, slot in dict(zip(job.crop_images, job.crop_frames)).items():
            scores = per_image[image]
            z = scores[0] if len(scores) == 1 else combine_tile_log_odds(scores)
            frame_log_odds[slot] = max(frame_log_odds[slot], z)
        frame_scores = [self.calibrated_score(z) for z in frame_log_odds]
        raw_frame_scores = [sigmoid(z) for z in frame_log_odds]
        score = float(np.mean(frame_scores))
        decision = self.decisions["frame" if result["kind"] == IMAGE else "video"]
        result["score"] = score
        result["raw_score"] = float(np.mean(raw_frame_scores))
        result["label"] = decision.label(score)
        result["operating_point"] = decision.describe()
        if self.options.per_frame and result["kind"] != IMAGE:
            result["frame_scores"] = [
                {"frame": index, "score": s, "raw_score": r, "faces": n}
                for index, s, r, n in zip(job.frame_ids, frame_scores, raw_frame_scores, job.faces_per_frame)
            ]
        if self.explainer is not None:
            from masm.explain.outputs import write_explanations

            try:
                result.update(write_explanations(self.options.explain_dir, job, frame_scores))
            except OSError as err:
                result["error"] = f"{result['input']}: cannot write its explanation ({err.strerror or err})"
            except Exception as err:  # a drawing failure on odd content must not end the run either
                log.debug("%s: explanation failed", result["input"], exc_info=True)
                result["error"] = (
                    f"{result['input']}: cannot draw its explanation ({type(err).__name__}: {err})"
                )
            job.frames, job.maps = [], []  # the images are not needed any more
        return result

"""Whole images of any size -> model inputs of ``S`` x ``S`` pixels, never resized when avoidable.

Detectors of AI-generated images look for a generator's high-frequency traces, which a resize smooths
away; so, as in CNNDetection, UniversalFakeDetect and Effort, the model sees crops at the image's own
resolution (:class:`masm.models.preprocessing.WholeImageConfig` names the policies):

- training (:class:`WholeImageAugmentation`): Gaussian blur and JPEG re-compression, each with its
  probability (CNNDetection's "blur_jpg_prob 0.1" recipe), then a random ``S`` x ``S`` crop (an image
  smaller than ``S`` is first resized up, short side to ``S``), then a horizontal flip;
- ``center_crop`` (:func:`center_crop`): the centre ``S`` x ``S`` crop; a side shorter than
  ``small_side`` is first repeated periodically up to it (the image continues with its own first rows
  or columns), as Effort's UniversalFakeDetect evaluation tiles small images up to 256 before its centre
  crop of 224;
- ``tiles`` (:func:`tile_origins`): ``S`` x ``S`` tiles on a regular grid whose last row and column sit
  against the far edges, so every pixel is seen (a side shorter than ``S`` repeated periodically up to
  ``S``); the image's score combines its tiles' by :func:`combine_tile_log_odds`.

Every crop is taken through periodic indices (:func:`periodic_crop`), so the ONNX graph
(:mod:`masm.inference.onnx_graph`) can take the very same pixels with two ``Gather`` nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from masm.models.preprocessing import WholeImageConfig


def periodic_crop(rgb: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` crop at ``(top, left)`` of ``rgb`` repeated periodically in both directions
    (row ``y`` of the repeated image is row ``y % H``); inside the image it is a plain slice."""
    height, width = rgb.shape[:2]
    if top + size <= height and left + size <= width:
        return rgb[top : top + size, left : left + size]
    rows = (top + np.arange(size)) % height
    cols = (left + np.arange(size)) % width
    return rgb[np.ix_(rows, cols)]


def center_origin(height: int, width: int, size: int, small_side: int) -> tuple[int, int]:
    """``(top, left)`` of the ``center_crop`` policy's crop in the periodically repeated image: the centre
    of the image, each side shorter than ``small_side`` counted as ``small_side``."""
    return (max(height, small_side) - size) // 2, (max(width, small_side) - size) // 2


def center_crop(rgb: np.ndarray, size: int, small_side: int) -> np.ndarray:
    """The ``center_crop`` policy's model input (uint8 ``size`` x ``size`` x 3), no resize."""
    return periodic_crop(rgb, *center_origin(rgb.shape[0], rgb.shape[1], size, small_side), size)


def _grid(side: int, size: int) -> list[int]:
    """Tile starts along one side: every ``size`` pixels, the last one against the far edge."""
    side = max(side, size)
    count = math.ceil(side / size)
    return [i * size for i in range(count - 1)] + [side - size]


def tile_origins(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """``(top, left)`` of every tile of the ``tiles`` policy, row by row; together they cover the image."""
    return [(top, left) for top in _grid(height, size) for left in _grid(width, size)]


def tiles(rgb: np.ndarray, size: int) -> list[np.ndarray]:
    """The ``tiles`` policy's model inputs (uint8 ``size`` x ``size`` x 3 each), in :func:`tile_origins`
    order."""
    return [periodic_crop(rgb, top, left, size) for top, left in tile_origins(*rgb.shape[:2], size)]


def combine_tile_log_odds(log_odds: Sequence[float]) -> float:
    """An image's log-odds of "fake" from its tiles': the log-odds of the mean of the tiles' P(fake).

    Why the mean of probabilities: every tile of a generated image is generated, and a tile's influence
    stays bounded (1 / number of tiles), where a mean of log-odds lets one saturated tile (log-odds 40
    against nine at -2) decide the image alone. Why one log-odds per image rather than the mean of the
    tiles' calibrated scores: the temperature and the operating points are fitted on one log-odds per image
    (evaluation and ``masm calibrate`` score the same tiles), so ``masm detect`` must score an image the same
    way for the stored thresholds to keep their false-positive rates. Computed in log space, so that tiles
    with log-odds of +-1000 lose nothing to a float64 P(fake) of exactly 0 or 1.
    """
    z = np.asarray(log_odds, dtype=np.float64)
    if z.size == 0:
        raise ValueError("combine_tile_log_odds: no tile")
    log_fake = np.logaddexp.reduce(-np.logaddexp(0.0, -z))  # log sum P(fake)
    log_real = np.logaddexp.reduce(-np.logaddexp(0.0, z))  # log sum P(real)
    return float(log_fake - log_real)


def enlarge_to(rgb: np.ndarray, size: int) -> np.ndarray:
    """``rgb`` with its short side resized up to ``size`` (bicubic) when shorter; otherwise unchanged."""
    import cv2

    height, width = rgb.shape[:2]
    if min(height, width) >= size:
        return rgb
    factor = size / min(height, width)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    return cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_CUBIC)


class WholeImageAugmentation:
    """The training transform of a whole image up to its ``S`` x ``S`` crop: blur, JPEG, crop, flip.

    Called as an albumentations pipeline is (``aug(image=rgb)["image"]``) and seeded the same way
    (:meth:`set_random_seed`, per sample by the training loader, so a resumed run draws the same crops).
    ``augment=False`` keeps the random crop (the policy's geometry) and drops flip, blur and JPEG;
    ``crop=False`` (policy ``resize``) leaves the image whole for the resize that follows.
    """

    def __init__(
        self, config: WholeImageConfig, size: int, *, augment: bool = True, crop: bool = True, seed: int = 0
    ):
        self.config = config
        self.size = size
        self.augment = augment
        self.crop = crop
        self._rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        cfg, rng = self.config, self._rng
        rgb = enlarge_to(image, self.size) if self.crop else image
        # CNNDetection's order: blur and JPEG on the image as it is, then the crop, then the flip.
        if self.augment and rng.random() < cfg.blur_prob:
            rgb = gaussian_blur(rgb, float(rng.uniform(*cfg.blur_sigma)))
        if self.augment and rng.random() < cfg.jpeg_prob:
            rgb = jpeg_recompress(rgb, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
        if self.crop:
            top = int(rng.integers(0, rgb.shape[0] - self.size + 1))
            left = int(rng.integers(0, rgb.shape[1] - self.size + 1))
            rgb = rgb[top : top + self.size, left : left + self.size]
        if self.augment and rng.random() < cfg.hflip:
            rgb = rgb[:, ::-1]
        return {"image": np.ascontiguousarray(rgb)}


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (0: unchanged)."""
    import cv2

    if sigma <= 0.0:
        return rgb
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def jpeg_recompress(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` encoded as JPEG at ``quality`` and decoded again (OpenCV's codec)."""
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])

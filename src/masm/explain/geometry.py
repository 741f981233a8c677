"""Where a model input's pixels came from: 2x3 affine matrices from frame pixels to model-input pixels.

A map is computed on the model input (``S`` x ``S``); people look at the frame it was cut from. Every
crop therefore carries the matrix that made it, and :func:`to_frame` pulls the map back through its
inverse. For whole images the matrix is :func:`input_matrix` (the eval transform's resize of the short
side and centre crop); for aligned faces it is that resize after the alignment's similarity transform
(:func:`compose`), so the map lands on the face in the original frame.
"""

from __future__ import annotations

import numpy as np


def input_matrix(height: int, width: int, size: int) -> np.ndarray:
    """Frame pixels -> model input pixels for :func:`masm.data.transforms.resize_square` of an image."""
    if (height, width) == (size, size):
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    factor = size / min(height, width)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    fx, fy = new_w / width, new_h / height
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # cv2.resize maps pixel centres: x' + 0.5 = (x + 0.5) * fx
    return np.array([[fx, 0.0, 0.5 * fx - 0.5 - left], [0.0, fy, 0.5 * fy - 0.5 - top]])


def transform_matrices(transform, height: int, width: int) -> list[np.ndarray]:
    """Frame pixels -> model input pixels of each input a :class:`~masm.data.transforms.FrameTransform` makes
    of an image: the resize's :func:`input_matrix`, or, for a whole-image detector's crops and tiles (never
    resized), a shift per crop (pixels a crop repeats periodically fall outside the image)."""
    origins = transform.crop_origins(height, width)
    if origins is None:
        return [input_matrix(height, width, transform.size)]
    return [np.array([[1.0, 0.0, -float(left)], [0.0, 1.0, -float(top)]]) for top, left in origins]


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of ``outer`` applied after ``inner``."""
    full = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (np.vstack([outer, [0.0, 0.0, 1.0]]) @ full)[:2]


def to_frame(map_: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``map_`` (model input pixels) in frame pixels ``shape = (H, W)``; 0 where the model saw nothing."""
    import cv2

    return cv2.warpAffine(
        np.ascontiguousarray(map_, dtype=np.float32),
        np.asarray(matrix, dtype=np.float64),
        (int(shape[1]), int(shape[0])),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )

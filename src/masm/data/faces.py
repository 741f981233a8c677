"""Face detection, 5 landmarks and similarity alignment to the ArcFace template.

Detection: dlib's built-in HOG detector on a frame downscaled to ``detect_width`` (boxes mapped back),
first without upsampling, then with one upsampling step if nothing was found (finds faces down to ~40 px
at the detection width); OpenCV's Haar cascade as a last resort where this OpenCV build still ships it
(OpenCV 5 wheels dropped ``CascadeClassifier``, hence the <5 pin; without it the fallback is skipped).

Landmarks: dlib's 68-point model from ``face-recognition-models``, run on the full-resolution frame. It
gives exactly the ArcFace points: eye centres (mean of the 6 eye-contour points), nose tip (point 30) and
mouth corners (48, 54). The package's 5-point model only has eye corners and the base of the nose, so mouth
corners would have to be guessed, which shifts the vertical scale of every crop; the 68-point model costs
~1 ms more per face and ~100 MB once per process.

All weights come from installed packages; nothing is downloaded. Images are RGB ``uint8`` throughout.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masm.errors import MasmError

# ArcFace 5-point template for a 112x112 crop: left eye, right eye, nose tip, left / right mouth corner
# (left/right as seen in the image).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def align_template(crop_size: int = 256, scale: float = 1.3) -> np.ndarray:
    """The ArcFace template (5, 2) for a ``crop_size`` crop whose face occupies ``crop_size / scale``.

    The 112-px template is scaled about its crop centre, so ``scale=1`` is the ArcFace crop itself and
    ``scale=1.3`` adds DeepfakeBench's margin.
    """
    factor = crop_size / (112.0 * scale)
    return (ARCFACE_TEMPLATE_112 - 56.0) * factor + crop_size / 2.0


@dataclass
class Face:
    """A detected face: ``box`` (x0, y0, x1, y1) in frame pixels, ``landmarks`` (5, 2) x/y, ``score``."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def _model_path(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MasmError("face landmarks need the package face-recognition-models (pip install 'masm[faces]')")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise MasmError(f"landmark model missing from face-recognition-models: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        import dlib
    except ImportError:
        raise MasmError(
            "face detection needs dlib (pip install 'masm[faces]', which installs dlib-bin)"
        ) from None
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_model_path("shape_predictor_68_face_landmarks.dat")))
    return dlib, detector, predictor


@functools.lru_cache(maxsize=1)
def _haar_cascade():
    import cv2

    data = getattr(cv2, "data", None)
    if not hasattr(cv2, "CascadeClassifier") or data is None:
        return None
    path = Path(data.haarcascades) / "haarcascade_frontalface_default.xml"
    if not path.is_file():
        return None
    cascade = cv2.CascadeClassifier(str(path))
    return None if cascade.empty() else cascade


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` to ``dst``: 2x3.

    Umeyama's closed form, the same estimate as ``skimage.transform.SimilarityTransform``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / len(src)
    scale = (s * d).sum() / var_src
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = dst_mean - scale * rot @ src_mean
    return matrix


class FaceAligner:
    """Detect faces and cut out aligned crops.

    ``crop_size`` and ``scale`` define the output (see :func:`align_template`); ``detect_width`` is the
    width frames are downscaled to for detection (``0``: full resolution).
    """

    def __init__(self, crop_size: int = 256, scale: float = 1.3, detect_width: int = 640):
        if crop_size < 8 or scale <= 0:
            raise MasmError(f"face crop: size must be >= 8 and scale > 0 (got {crop_size}, {scale})")
        self.crop_size = crop_size
        self.scale = scale
        self.detect_width = detect_width
        self.template = align_template(crop_size, scale)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB frame, largest first (ties: higher score first)."""
        import cv2

        dlib, detector, predictor = _dlib_models()
        rgb = np.ascontiguousarray(rgb)
        height, width = rgb.shape[:2]
        factor = 1.0
        small = rgb
        if self.detect_width and width > self.detect_width:
            factor = width / self.detect_width
            small = cv2.resize(
                rgb, (self.detect_width, max(1, round(height / factor))), interpolation=cv2.INTER_AREA
            )
        boxes: list[tuple[float, float, float, float, float]] = []
        for upsample in (0, 1):
            rects, scores, _ = detector.run(small, upsample, 0.0)
            boxes = [(r.left(), r.top(), r.right(), r.bottom(), s) for r, s in zip(rects, scores)]
            if boxes:
                break
        if not boxes and (cascade := _haar_cascade()) is not None:
            gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            boxes = [(x, y, x + w, y + h, 0.0) for x, y, w, h in cascade.detectMultiScale(gray, 1.1, 5)]
        faces = []
        for x0, y0, x1, y1, score in boxes:
            box = (x0 * factor, y0 * factor, x1 * factor, y1 * factor)
            rect = dlib.rectangle(*(int(round(v)) for v in box))
            faces.append(Face(box, _five_points(predictor(rgb, rect)), float(score)))
        faces.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def transform_for(self, face: Face) -> np.ndarray:
        """The 2x3 matrix mapping frame pixels to crop pixels for ``face``."""
        return similarity_transform(face.landmarks, self.template)

    def align(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The aligned ``crop_size`` x ``crop_size`` RGB crop of ``face`` (outside the frame: black)."""
        import cv2

        matrix = self.transform_for(face)
        return cv2.warpAffine(
            np.ascontiguousarray(rgb),
            matrix,
            (self.crop_size, self.crop_size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0),
        )


def _five_points(shape) -> np.ndarray:
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


class LandmarkFinder:
    """``finder(rgb) -> (68, 2)`` x/y landmarks of the largest face in ``rgb``, or ``None`` without one.

    For the face-shaped blending regions of pseudo-fakes. Frames there are already face crops, so the
    detector runs at their own size. Without dlib, ``required=False`` finds no faces (pseudo-fakes then
    use random regions, with one warning); ``required=True`` raises the install hint.
    """

    def __init__(self, required: bool = False):
        self.required = required
        self.available = True
        try:
            _dlib_models()
        except MasmError as err:
            if required:
                raise
            import logging

            logging.getLogger(__name__).warning("%s; pseudo-fakes use random regions instead of faces", err)
            self.available = False

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        if not self.available:
            return None
        dlib, detector, predictor = _dlib_models()
        rgb = np.ascontiguousarray(rgb)
        rects = []
        for upsample in (0, 1):
            rects = list(detector(rgb, upsample))
            if rects:
                break
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        shape = predictor(rgb, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

"""The face detector's fallback: OpenCV's bundled Haar cascade when dlib's HOG detector finds nothing."""

from __future__ import annotations

import numpy as np
import skimage.data

from masm.data import faces


class _BlindDetector:
    """Stands in for dlib's HOG detector and never finds a face."""

    def run(self, image, upsample, threshold):
        return [], [], []


def test_haar_cascade_finds_the_face_dlib_missed(monkeypatch):
    assert faces._haar_cascade() is not None, "OpenCV without CascadeClassifier: the fallback is gone"
    image = skimage.data.astronaut()
    real_dlib, detector, predictor = faces._dlib_models()
    reference = faces.FaceAligner().detect(image)[0]
    monkeypatch.setattr(faces, "_dlib_models", lambda: (real_dlib, _BlindDetector(), predictor))
    found = faces.FaceAligner().detect(image)
    assert found, "the Haar fallback found no face"
    # The fallback's face is the same face: its landmarks are close to those found via dlib's box.
    assert np.abs(found[0].landmarks - reference.landmarks).max() < 12

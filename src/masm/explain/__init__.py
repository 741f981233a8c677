"""Explanation maps: where in an image a detector finds the evidence for "fake".

``masm.explain(detector, images)`` returns one map per image, float32 in [0, 1] at the image's size
(:func:`masm.explain.maps.explain`): gradient-weighted attention relevance over the ViT's patch tokens,
one forward and one backward per batch, for every backbone family, merged or not.

- :mod:`.maps`: the public function, batching, the method registry;
- :mod:`.explanation`: what every method returns (:class:`Explanation`) and the steps they share;
- :mod:`.relevance`: gradient-weighted attention relevance (Chefer et al.), the default;
- :mod:`.gradcam`: Grad-CAM over the patch tokens (kept for comparison);
- :mod:`.geometry`: maps carried back from the model input onto the frame (resize, face alignment);
- :mod:`.render`: overlays, video contact sheets and example sheets;
- :mod:`.outputs`: the files ``masm detect --explain`` writes; :mod:`.examples`: ``masm eval``'s sheets;
- :mod:`.evaluate`: :mod:`masm.evaluation.evaluate` with those sheets (``masm eval``, training, the demo);
- :mod:`.localization`: pixel AUC and pointing game against a known forgery region, and baseline maps.

This package is also callable, so that ``masm.explain(detector, images)`` works whether ``masm.explain``
was reached as the package (after any ``import masm.explain...``) or through ``masm``'s lazy exports.
"""

from __future__ import annotations

import sys
import types

from .explanation import Explanation
from .gradcam import TokenGradCAM
from .maps import DEFAULT_METHOD, explain, explain_batches, make_explainer
from .relevance import AttentionRelevance

__all__ = [
    "DEFAULT_METHOD",
    "AttentionRelevance",
    "Explanation",
    "TokenGradCAM",
    "explain",
    "explain_batches",
    "make_explainer",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

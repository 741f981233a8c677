"""Inference: score images and videos with a detector, and export it (merged checkpoint, ONNX).

- :class:`masm.inference.detect.Scorer`, :class:`masm.inference.detect.ScorerOptions`
- :func:`masm.inference.inputs.expand_inputs` (files, folders, ``-`` for stdin)
- :func:`masm.inference.export.export_merged`, :func:`masm.inference.export.export_onnx`
"""

from .detect import RESULT_KEYS, Scorer, ScorerOptions
from .export import export_merged, export_onnx
from .inputs import Input, expand_inputs

__all__ = ["RESULT_KEYS", "Input", "Scorer", "ScorerOptions", "expand_inputs", "export_merged", "export_onnx"]

"""The ONNX nodes around an exported detector: image -> model input before it, logits -> scores after it.

How OpenCV's two interpolations live in ONNX (both checked against ``cv2.resize`` pixel for pixel in
``tests/test_export.py``): INTER_CUBIC is ONNX ``Resize`` mode ``cubic`` with OpenCV's coefficient
(``cubic_coeff_a=-0.75``), ``half_pixel`` coordinates and edge replication (``exclude_outside=0``),
then rounded and clipped to 0..255 as OpenCV's uint8 output is. INTER_AREA has no ONNX mode: it is
written out as what it is, each output pixel the weighted mean of the input pixels its area covers, with
OpenCV's weights, summed in float32 term by term in OpenCV's order (along the width, then the height) by
two ``Loop`` nodes, so that values that fall on a half round as OpenCV's do; a matrix product would sum
in another order and differ by one grey level now and then. Its work grows with the pixel count (about
2 s for a 12-megapixel photo on two busy CPU cores, milliseconds for a face crop). OpenCV rounds these
means half to even, except for an exact 2x reduction, where its fast path rounds half up; the graph does
the same. A whole-image detector whose test policy is ``center_crop`` resizes nothing: two ``Gather``
nodes take the rows and columns of its centre crop by periodic indices, exactly as
:func:`masm.data.whole_image.center_crop` does; the ``tiles`` policy is not exported. Faces are not found
in the graph: a model trained on aligned face crops (its ``face_crop``, in
the metadata) wants the crops ``masm preprocess`` writes, as ``masm detect --no-face`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from masm.errors import MasmError
from masm.models import Detector
from masm.models.preprocessing import Preprocessing


class _GraphWriter:
    """Appends ONNX nodes with fresh output names (``pre/N``) and constants as initializers."""

    def __init__(self, prefix: str = "pre/") -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.prefix = prefix
        self._count = 0

    def _name(self) -> str:
        self._count += 1
        return f"{self.prefix}{self._count}"

    def const(self, value: Any, dtype: Any) -> str:
        from onnx import numpy_helper

        name = self._name()
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        name = out or self._name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"{name}_{op_type}", **attrs))
        return name


def check_exportable(preprocessing: Preprocessing) -> None:
    """Refuse preprocessing the graph cannot do: tiles (one image, several model inputs, one score)."""
    whole = preprocessing.whole_image
    if whole is not None and whole.test == "tiles":
        raise MasmError(
            "ONNX export of a detector that scores images by tiles (whole_image.test: tiles) is not "
            "supported: export it with whole_image.test center_crop or resize"
        )


def prepend_preprocessing(model, detector: Detector, n_logits: int) -> None:
    """Turn ``model`` (pixel_values -> logits) into image -> logits, score, raw_score (see the module
    docstring)."""
    from onnx import TensorProto, helper

    pre = detector.preprocessing
    check_exportable(pre)
    whole = pre.whole_image
    g = _GraphWriter()
    i64 = np.int64
    if whole is not None and whole.test == "center_crop":
        crop = _center_crop(g, pre.input_size, whole.small_side)
    else:
        crop = _resize_and_centre_crop(g, pre.input_size)

    # Normalisation, as FrameTransform does it (float32 mean and std times 255).
    mean = (np.asarray(pre.mean, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)
    std = (np.asarray(pre.std, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)
    g.op("Div", g.op("Sub", crop, g.const(mean, np.float32)), g.const(std, np.float32), out="pixel_values")

    before = len(g.nodes)  # the nodes above feed the detector, the ones below read its logits
    # log-odds of "fake": l_fake - l_real of a two-logit head (softmax), the logit of a one-logit head
    if n_logits == 2:
        fake = g.op("Gather", "logits", g.const(1, i64), axis=1)
        log_odds = g.op("Sub", fake, g.op("Gather", "logits", g.const(0, i64), axis=1))
    else:
        log_odds = g.op("Gather", "logits", g.const(0, i64), axis=1)
    raw_score = g.op("Sigmoid", log_odds, out="raw_score")
    temperature = np.float32(detector.calibration.temperature if detector.calibration else 1.0)
    score = g.op("Sigmoid", g.op("Div", log_odds, g.const(temperature, np.float32)), out="score")

    graph = model.graph
    detector_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(g.nodes[:before] + detector_nodes + g.nodes[before:])
    graph.initializer.extend(g.initializers)
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])
    )
    graph.output.append(helper.make_tensor_value_info(score, TensorProto.FLOAT, ["batch"]))
    graph.output.append(helper.make_tensor_value_info(raw_score, TensorProto.FLOAT, ["batch"]))


def _resize_and_centre_crop(g: _GraphWriter, size: int) -> str:
    """Nodes from ``image`` to its input (N, 3, S, S) as :func:`masm.data.transforms.resize_square` makes it:
    short side resized to S as OpenCV does (see the module docstring), centre square; float32 0..255."""
    from onnx import TensorProto, helper

    f64, i64 = np.float64, np.int64
    size_i, size_d = g.const([size], i64), g.const([float(size)], f64)
    one_d, zero_d, two_i = g.const(1.0, f64), g.const(0.0, f64), g.const([2], i64)

    image = g.op("Transpose", g.op("Cast", "image", to=TensorProto.FLOAT), perm=[0, 3, 1, 2])  # N 3 H W
    shape = g.op("Shape", "image")
    height = g.op("Slice", shape, g.const([1], i64), g.const([2], i64))
    width = g.op("Slice", shape, g.const([2], i64), g.const([3], i64))

    def as_double(name: str) -> str:
        return g.op("Cast", name, to=TensorProto.DOUBLE)

    # New size as resize_square computes it: max(S, round(side * S / min(H, W))), in float64.
    short = g.op("Min", as_double(height), as_double(width))
    factor = g.op("Div", size_d, short)

    def new_side(side: str) -> str:
        rounded = g.op("Cast", g.op("Round", g.op("Mul", as_double(side), factor)), to=TensorProto.INT64)
        return g.op("Max", rounded, size_i)

    new_h, new_w = new_side(height), new_side(width)

    # Enlarging: OpenCV INTER_CUBIC = Resize cubic, a = -0.75, half-pixel, edges replicated; uint8 rounding.
    sizes = g.op(
        "Concat",
        g.op("Slice", shape, g.const([0], i64), g.const([1], i64)),
        g.const([3], i64),
        new_h,
        new_w,
        axis=0,
    )
    cubic = g.op(
        "Resize",
        image,
        "",
        "",
        sizes,
        mode="cubic",
        cubic_coeff_a=-0.75,
        coordinate_transformation_mode="half_pixel",
        exclude_outside=0,
    )
    cubic = g.op("Round", cubic)

    # Shrinking: OpenCV INTER_AREA = mean over the covered input area, summed in OpenCV's order (below).
    scalar = g.const([], i64)

    def area_taps(side: str, new: str) -> tuple[str, str, str]:
        """Per output pixel i its K input pixels j = floor(i * scale) + k and their float32 weights
        overlap([j, j+1), [i * scale, (i + 1) * scale)) / scale, scale = side / new; overlaps of at most
        1e-3 are left out, as OpenCV leaves them out. Returns (indices (new, K), weights (new, K), K)."""
        scale = g.op("Div", as_double(side), as_double(new))
        taps = g.op("Add", g.op("Cast", g.op("Ceil", scale), to=TensorProto.INT64), g.const([1], i64))
        i = g.op("Range", g.const(0, i64), g.op("Reshape", new, scalar), g.const(1, i64))
        i = g.op("Unsqueeze", as_double(i), g.const([1], i64))  # (new, 1)
        k = as_double(g.op("Range", g.const(0, i64), g.op("Reshape", taps, scalar), g.const(1, i64)))
        j = g.op("Add", g.op("Floor", g.op("Mul", i, scale)), k)  # (new, K)
        low = g.op("Max", g.op("Mul", i, scale), j)
        high = g.op("Min", g.op("Mul", g.op("Add", i, one_d), scale), g.op("Add", j, one_d))
        overlap = g.op("Sub", high, low)
        overlap = g.op("Where", g.op("Greater", overlap, g.const(1e-3, f64)), overlap, zero_d)
        weights = g.op("Cast", g.op("Div", overlap, scale), to=TensorProto.FLOAT)
        last = g.op("Sub", as_double(side), one_d)
        indices = g.op("Cast", g.op("Min", j, last), to=TensorProto.INT64)
        return indices, weights, g.op("Reshape", taps, scalar)

    def area_pass(source: str, side: str, new: str, axis: int) -> str:
        """sum over k of source[.., indices[:, k], ..] * weights[:, k] along ``axis``, k = 0, 1, ... in turn:
        OpenCV's float32 sums, term by term in the same order, so that even halves round as OpenCV's do
        (a matrix product sums in another order and differs from OpenCV in the last bit now and then)."""
        indices, weights, taps = area_taps(side, new)
        out_shape = g.op("Shape", source)
        out_shape = g.op(
            "Concat",
            g.op("Slice", out_shape, g.const([0], i64), g.const([axis], i64)),
            new,
            g.op("Slice", out_shape, g.const([axis + 1], i64), g.const([4], i64)),
            axis=0,
        )
        start = g.op(
            "ConstantOfShape", out_shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        )
        body = _GraphWriter(prefix=f"area{axis}/")
        k, cond_in, sum_in = (f"area{axis}/{name}" for name in ("k", "cond_in", "sum_in"))
        step_indices = body.op("Gather", indices, k, axis=1)
        step_weights = body.op("Gather", weights, k, axis=1)
        if axis == 2:  # weights per output row: (new, 1) against (N, 3, new, W)
            step_weights = body.op("Unsqueeze", step_weights, body.const([1], i64))
        picked = body.op("Gather", source, step_indices, axis=axis)
        body.op("Add", sum_in, body.op("Mul", picked, step_weights), out=f"area{axis}/sum_out")
        body.op("Identity", cond_in, out=f"area{axis}/cond_out")
        graph = helper.make_graph(
            body.nodes,
            f"area_pass_{axis}",
            [
                helper.make_tensor_value_info(k, TensorProto.INT64, []),
                helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
                helper.make_tensor_value_info(sum_in, TensorProto.FLOAT, None),
            ],
            [
                helper.make_tensor_value_info(f"area{axis}/cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info(f"area{axis}/sum_out", TensorProto.FLOAT, None),
            ],
            initializer=body.initializers,
        )
        return g.op("Loop", taps, "", start, body=graph)

    # OpenCV sums each output pixel's row first (along the width), then those rows (along the height).
    area = area_pass(area_pass(image, width, new_w, axis=3), height, new_h, axis=2)
    # OpenCV rounds half to even, except its exact-2x fast path, which rounds half up.
    exact_2x = g.op(
        "And",
        g.op("Equal", height, g.op("Mul", new_h, two_i)),
        g.op("Equal", width, g.op("Mul", new_w, two_i)),
    )
    half_up = g.op("Floor", g.op("Add", area, g.const(0.5, np.float32)))
    area = g.op("Where", exact_2x, half_up, g.op("Round", area))

    shrink = g.op("Greater", short, size_d)
    resized = g.op(
        "Clip", g.op("Where", shrink, area, cubic), g.const(0.0, np.float32), g.const(255.0, np.float32)
    )

    # Centre crop, as resize_square does it.
    top = g.op("Div", g.op("Sub", new_h, size_i), two_i)
    left = g.op("Div", g.op("Sub", new_w, size_i), two_i)
    starts = g.op("Concat", top, left, axis=0)
    ends = g.op("Add", starts, g.op("Concat", size_i, size_i, axis=0))
    crop = g.op("Slice", resized, starts, ends, g.const([2, 3], i64))
    return crop


def _center_crop(g: _GraphWriter, size: int, small_side: int) -> str:
    """Nodes from ``image`` to its input (N, 3, S, S) under the ``center_crop`` policy, as
    :func:`masm.data.whole_image.center_crop` takes it: no resize; rows ``(top + k) % H`` and columns
    ``(left + k) % W``, k < S, with ``top = (max(H, small_side) - S) // 2`` (likewise ``left``), i.e. the
    centre crop of the image repeated periodically up to ``small_side``; float32 0..255."""
    from onnx import TensorProto

    i64 = np.int64
    shape = g.op("Shape", "image")
    steps = g.op("Range", g.const(0, i64), g.const(size, i64), g.const(1, i64))

    def indices(axis: int) -> str:
        side = g.op("Slice", shape, g.const([axis], i64), g.const([axis + 1], i64))
        extended = g.op("Max", side, g.const([small_side], i64))
        start = g.op("Div", g.op("Sub", extended, g.const([size], i64)), g.const([2], i64))
        return g.op("Mod", g.op("Add", steps, start), side)

    rows = g.op("Gather", "image", indices(1), axis=1)
    crop = g.op("Gather", rows, indices(2), axis=2)  # N S S 3, uint8
    return g.op("Transpose", g.op("Cast", crop, to=TensorProto.FLOAT), perm=[0, 3, 1, 2])

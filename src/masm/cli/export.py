"""``masm export``: a checkpoint as a merged checkpoint (plain backbone weights) or an ONNX model."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint as merged weights or ONNX",
        description=(
            "merged: a checkpoint directory of plain backbone weights (adapters folded in) and the head, "
            "loadable by `masm detect` without the MASM code path. onnx: the merged detector as ONNX "
            "(input pixel_values N x 3 x S x S float32, dynamic batch; output logits N x 2), checked against "
            "PyTorch with onnxruntime, with its preprocessing in <name>.preprocessing.json beside it."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("--format", required=True, choices=("merged", "onnx"), help="what to write")
    parser.add_argument("--out", required=True, help="output directory (merged) or .onnx file (onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.errors import MasmError
    from masm.inference.export import DEFAULT_OPSET, export_merged, export_onnx

    if args.format == "merged":
        if args.opset is not None:
            raise MasmError("--opset applies to --format onnx only")
        print(f"wrote merged checkpoint {export_merged(args.checkpoint, args.out)}")
        return 0
    report = export_onnx(args.checkpoint, args.out, opset=args.opset or DEFAULT_OPSET)
    diff = report["max_abs_diff"]
    check = "not verified (onnxruntime not installed)" if diff is None else f"max |logit diff| {diff:.2e}"
    print(f"wrote {report['onnx']} (opset {report['opset']}, {check}) and {report['preprocessing']}")
    return 0

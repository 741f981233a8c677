"""``masm export``: a checkpoint as a merged checkpoint (plain backbone weights) or an ONNX model."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint as merged weights or ONNX",
        description=(
            "merged: a checkpoint directory of plain backbone weights (adapters folded in) and the head, "
            "which masm detect and masm eval read like any checkpoint. onnx: the detector as one ONNX "
            "file that takes the image as it is (uint8 RGB, N x H x W x 3, any size) and does the resize, "
            "centre crop and normalisation itself, exactly as masm detect does; outputs logits (N x 2) "
            "and score (N, P(fake)). Its preprocessing is also in the model's metadata and beside it in "
            "NAME.preprocessing.json. The export is checked against masm detect's scores with "
            "onnxruntime. Faces are not detected in the graph: for a face model, give it aligned face "
            "crops (masm preprocess)."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("--format", required=True, choices=("merged", "onnx"), help="what to write")
    parser.add_argument("--out", required=True, help="output directory (merged) or .onnx file (onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
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
    check = (
        "not verified (onnxruntime not installed)"
        if diff is None
        else f"scores within {diff:.1e} of masm detect's"
    )
    print(f"wrote {report['onnx']} (opset {report['opset']}, {check}) and {report['preprocessing']}")
    return 0

"""``masm import effort``: a published Effort detector as a masm checkpoint directory."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a detector published by another project",
        description="Convert a detector published by another project into a masm checkpoint directory.",
    )
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    effort = sub.add_parser(
        "effort",
        help="an Effort (ICML 2025) .pth checkpoint",
        description=(
            "Read an Effort checkpoint (only tensors are loaded from it, never code), convert every adapted "
            "layer exactly into masm's form, check each against Effort's own formula, and write a masm "
            "checkpoint directory (merged weights) with Effort's preprocessing: aligned face crop, 224 "
            "pixels, CLIP mean and std. masm detect and masm eval read it, and masm train starts from it "
            "with --set model.backbone=OUT."
        ),
    )
    effort.add_argument("checkpoint", help="Effort .pth (or .safetensors) file")
    effort.add_argument("--out", required=True, help="masm checkpoint directory to write")
    effort.add_argument(
        "--backbone",
        default="clip-vit-l14",
        help="architecture: a registry name or a directory with a config.json (the weights come from the "
        "checkpoint, nothing is downloaded)",
    )
    effort.set_defaults(func=run)


def run(args) -> int:
    from masm.models.effort_import import import_effort

    out, info = import_effort(args.checkpoint, args.out, backbone=args.backbone)
    source = info["imported_from"]
    notes = "".join(f"; {note}" for note in source["notes"])
    print(
        f"imported {source['adapted_layers']} Effort layers (residual rank {source['residual_rank']}) and the "
        f"head from {args.checkpoint}{notes}"
    )
    print(f"wrote {out} (merged weights; every layer matches Effort's formula)")
    return 0

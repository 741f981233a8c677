"""``masm import effort``: a published Effort detector (face or AI-generated image) as a masm checkpoint
directory."""

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
            "Read an Effort checkpoint (only tensors are loaded from it, never code) in the layout of "
            "Effort's DeepfakeBench code (face detectors: backbone.*, head.*) or of its "
            "UniversalFakeDetect code (AI-generated image detectors: a whole CLIPModel under model.*, a "
            "one-logit fc.*), recognised from its keys; every key must be one the layout has. Convert every "
            "adapted layer exactly into masm's form, check each against Effort's own formula, and write a "
            "masm checkpoint directory (merged weights, the head's one or two logits kept) with Effort's "
            "preprocessing: the aligned face crop, or for UniversalFakeDetect files (and with --whole-image) "
            "the whole image's centre crop without resizing; CLIP mean and std. masm detect and masm eval "
            "read it, and masm train starts from it with --set model.backbone=OUT."
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
    effort.add_argument(
        "--whole-image",
        action="store_true",
        help="whole-image preprocessing (no face crop) also for a DeepfakeBench-layout file (always for a "
        "UniversalFakeDetect one)",
    )
    effort.set_defaults(func=run)


def run(args) -> int:
    from masm.models.effort_import import import_effort

    out, info = import_effort(
        args.checkpoint, args.out, backbone=args.backbone, whole_image=args.whole_image or None
    )
    source = info["imported_from"]
    notes = "".join(f"; {note}" for note in source["notes"])
    layout = {"deepfakebench": "DeepfakeBench", "univfd": "UniversalFakeDetect"}[source["layout"]]
    logits = "one-logit (sigmoid)" if source["head_logits"] == 1 else "two-logit (softmax)"
    print(
        f"imported {source['adapted_layers']} Effort layers (residual rank {source['residual_rank']}) and the "
        f"{logits} head from {args.checkpoint} ({layout} layout){notes}"
    )
    crop = "whole images, centre crop" if source["whole_image"] else "aligned face crops"
    print(f"wrote {out} (merged weights; {crop}; every layer matches Effort's formula)")
    return 0

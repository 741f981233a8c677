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
            "Read an Effort checkpoint (torch.load with weights_only=True: nothing but tensors is unpickled; "
            "a raw state dict or one under 'state_dict'/'model'; 'module.' prefixes stripped; U_r/S_r/V_r "
            "may be absent), map weight_main + U_residual diag(S_residual) V_residual exactly onto masm's "
            "K=1 layer, check every layer against Effort's formula, and write a masm checkpoint directory "
            "(merged weights, safetensors) with Effort's preprocessing: aligned face crop, 224 px, CLIP "
            "mean/std. `masm detect`, `masm eval` and `masm train --set model.backbone=OUT` accept it."
        ),
    )
    effort.add_argument("checkpoint", help="Effort .pth (or .safetensors) file")
    effort.add_argument("--out", required=True, help="masm checkpoint directory to write")
    effort.add_argument(
        "--backbone",
        default="clip-vit-l14",
        help="architecture: a registry name or a directory with a config.json (weights come from the file; "
        "default clip-vit-l14, no download)",
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

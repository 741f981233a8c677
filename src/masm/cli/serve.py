"""``masm serve``: a detection service and a web page for a checkpoint."""

from __future__ import annotations

import os
import sys
from dataclasses import MISSING, fields


def register(subparsers) -> None:
    from masm.serve.options import API_KEY_ENV, ServeOptions

    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over HTTP: POST /v1/detect and a web page",
        description=(
            "Serve a detector: POST /v1/detect scores an uploaded image or video (the JSON of masm detect), "
            "GET /v1/model describes the model, GET /health, the API's OpenAPI page at /docs, and a web "
            "page at / to drop a file on. Requests that arrive together are scored in one batch. Uploads "
            "are untrusted: every limit below has a safe default, a bad upload gets a 4xx with a one-line "
            f"reason. Listens on 127.0.0.1 unless --host says otherwise; set --api-key (or ${API_KEY_ENV}) "
            "before listening elsewhere."
        ),
    )
    parser.add_argument("model", help="checkpoint directory (adapter or merged weights)")
    defaults = ServeOptions()
    for f in fields(ServeOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if f.default is not MISSING else None
        help_text = f.metadata["help"]
        if f.name == "faces":
            parser.add_argument("--no-faces", dest="faces", action="store_false", help="score whole images")
        elif f.name in ("api_key", "operating_point"):
            parser.add_argument(flag, default=None, help=help_text + " (default: none)")
        elif f.name == "threshold":
            parser.add_argument(flag, type=float, default=None, help=help_text + " (default: none)")
        else:
            kind = type(default)
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from masm.errors import MasmError
    from masm.serve.options import API_KEY_ENV, ServeOptions

    values = {f.name: getattr(args, f.name) for f in fields(ServeOptions)}
    values["api_key"] = values["api_key"] or os.environ.get(API_KEY_ENV) or None
    options = ServeOptions(**values)
    options.validate()
    _check_device(options.device)
    try:
        import uvicorn

        from masm.serve.app import create_app
    except ImportError as err:
        raise MasmError(f"masm serve needs the serve extra: pip install 'masm[serve]' ({err})") from None
    if options.exposed and options.api_key is None:
        print(
            f"masm serve: warning: listening on {options.host} without an API key: anyone who can reach "
            f"this address can use the service (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    app = create_app(args.model, options)
    # One process: the model is loaded once and every request shares its batches.
    uvicorn.run(app, host=options.host, port=options.port, log_level=args.log_level, workers=1)
    return 0


def _check_device(name: str) -> None:
    """A device that cannot be used is a one-line usage error, before the model is loaded."""
    import torch

    from masm.errors import MasmError

    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError) as err:
        raise MasmError(f"device {name!r} is not usable here ({err})") from None

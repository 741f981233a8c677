"""``masm serve``: a detection service (FastAPI) and a web page for untrusted uploads.

- :mod:`.options`: :class:`ServeOptions`, every setting and limit with its default;
- :mod:`.uploads`: receiving an upload into a private folder (size limit, no client filename as a path);
- :mod:`.limits`: the upload's type by content, and its pixels, length and frames before decoding;
- :mod:`.batching`: admission (503 when full), the batching window, the model's thread;
- :mod:`.maps`: explanation maps as overlays;
- :mod:`.app`: the routes (``/v1/detect``, ``/v1/model``, ``/health``, ``/``, ``/docs``).

FastAPI and uvicorn come with the ``serve`` extra (``pip install masm[serve]``); importing this package
does not need them, :func:`create_app` does.
"""

from .options import API_KEY_ENV, ServeOptions

__all__ = ["API_KEY_ENV", "ServeOptions", "create_app"]


def create_app(model, options: ServeOptions | None = None):
    """The FastAPI application serving the checkpoint directory ``model`` (see :mod:`.app`)."""
    from .app import create_app as _create_app

    return _create_app(model, options)

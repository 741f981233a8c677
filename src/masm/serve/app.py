"""The FastAPI application of ``masm serve``: ``POST /v1/detect``, ``GET /v1/model``, ``/health``, the page.

One request to ``/v1/detect`` goes: admission (or 503 with ``Retry-After``) -> the upload streamed into
the private folder (size limit) -> its type judged by content and its header checked against the limits
(a worker thread) -> decoded into crops by the same code as ``masm detect`` (a worker thread) -> scored in
a batch with the crops of whatever else arrived together (the model's thread) -> the ``masm detect`` JSON.
The upload is removed when the answer is ready. Every refusal is a 4xx whose JSON ``error`` is one line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from masm import __version__
from masm.inference import Input, Scorer, ScorerOptions

from .batching import Batcher, Busy
from .limits import judge_upload
from .maps import explain_crops, overlay_png
from .options import ServeOptions
from .uploads import UploadError, UploadFolder, receive

log = logging.getLogger(__name__)

STATIC = resources.files("masm.serve") / "static"
# The page loads nothing from elsewhere; the browser is told so, which also keeps injected content inert.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERROR_MODEL = {"content": {"application/json": {"example": {"error": "one line: what was wrong"}}}}


class Service:
    """The model, its batcher, the upload folder and the worker threads of one running service."""

    def __init__(self, model: str | Path, options: ServeOptions):
        options.validate()
        self.options = options
        self.model_dir = Path(model)
        scorer_options = ScorerOptions(
            batch_size=options.max_batch,
            frames=options.frames,
            faces=options.faces,
            operating_point=options.operating_point,
            threshold=options.threshold,
            per_frame=True,
            max_pixels=options.max_pixels,
        )
        self.scorer = Scorer(self.model_dir, scorer_options, device=options.device)
        self.info = model_info(self.model_dir, self.scorer, options)
        self.batcher = Batcher(
            self.scorer.log_odds_tensor,
            max_batch=options.max_batch,
            window_s=options.batch_window_ms / 1000,
            max_queue=options.max_queue,
        )
        self.folder = UploadFolder()
        self.pool = concurrent.futures.ThreadPoolExecutor(options.prepare_workers, "masm-serve-prepare")
        # dlib's detector is not documented as thread-safe: with faces, one upload is decoded at a time.
        self._prepare_lock = threading.Lock() if self.scorer.aligner is not None else None
        self.served = 0
        self.refused = 0

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.folder.remove()

    async def detect(self, request: Request, explain: bool) -> dict:
        with self.batcher.admit() as admission:
            path = self.folder.new_file()
            try:
                return await asyncio.wait_for(
                    self._detect(request, path, admission, explain), self.options.timeout_s
                )
            except asyncio.TimeoutError:
                raise UploadError(
                    408, f"not answered within the limit of {self.options.timeout_s:g} s (--timeout-s)"
                ) from None
            finally:
                path.unlink(missing_ok=True)

    async def _detect(self, request: Request, path: Path, admission, explain: bool) -> dict:
        label = await receive(request, path, self.options.max_upload_bytes)
        loop = asyncio.get_running_loop()
        kind = await loop.run_in_executor(self.pool, self._judge, path)
        job, crops = await loop.run_in_executor(self.pool, self._prepare, Input(str(path), kind))
        result = job.result
        result["input"] = label
        if result["error"] is not None:
            # The scorer names the file it read: the client is told its own label, not the server's path.
            result["error"] = " ".join(result["error"].replace(str(path), label).split())
            raise _Unscorable(result)
        scores = await self.batcher.score(admission, crops)
        result = self.scorer.finish(job, scores)
        if explain:
            result["explanation"] = await self.batcher.run_exclusive(lambda: self._explain(job, crops))
        self.served += 1
        return result

    def _judge(self, path: Path) -> str:
        try:
            return judge_upload(path, self.options)
        except UploadError:
            raise
        except Exception as err:  # odd content must get a 4xx, not a 500
            log.debug("judging an upload failed", exc_info=True)
            raise UploadError(422, f"cannot read the upload ({type(err).__name__})") from None

    def _prepare(self, item: Input):
        if self._prepare_lock is None:
            return self.scorer.prepare(item)
        with self._prepare_lock:
            return self.scorer.prepare(item)

    def _explain(self, job, crops) -> list[dict]:
        import torch

        batch = torch.stack(crops)
        maps = explain_crops(self.scorer.model, batch)
        pre = self.scorer.preprocessing
        frame_ids = [job.frame_ids[slot] for slot in job.crop_frames]
        return [
            {
                "frame": frame,
                "score": self.scorer.calibrated_score(log_odds),
                "map": overlay_png(crop, heat, pre.mean, pre.std),
            }
            for frame, log_odds, crop, heat in zip(frame_ids, job.scores, batch, maps)
        ]


class _Unscorable(Exception):
    """The upload was accepted but could not be scored: answered 422 with the full result."""

    def __init__(self, result: dict):
        super().__init__(result["error"])
        self.result = result


def model_info(model_dir: Path, scorer: Scorer, options: ServeOptions) -> dict:
    """What ``GET /v1/model`` answers: what the model is, how it reads images, and which files it is."""
    from masm.models import read_checkpoint_config

    config = read_checkpoint_config(model_dir)  # also verifies every data file's checksum
    model = scorer.model
    return {
        "backbone": model.config.backbone,
        "method": model.config.method.name,
        "weights": config["weights"],
        "preprocessing": asdict(scorer.preprocessing),
        # config.json lists the sha256 of every data file, so its own digest pins the whole checkpoint.
        "checksum": "sha256:" + hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "files": {name: f"sha256:{digest}" for name, digest in sorted(config["sha256"].items())},
        # where a label comes from: the operating point (name, threshold, level) images and videos get
        "operating_point": {level: d.describe() for level, d in scorer.decisions.items()},
        "calibration": scorer.calibration.to_dict() if scorer.calibration else None,
        "faces": scorer.aligner is not None,
        "device": str(scorer.device),
        "limits": {
            "max_upload_mb": options.max_upload_mb,
            "max_pixels": options.max_pixels,
            "max_video_pixels": options.max_video_pixels,
            "max_video_seconds": options.max_video_seconds,
            "max_video_frames": options.max_video_frames,
            "frames": options.frames,
            "timeout_s": options.timeout_s,
        },
        "batching": {
            "max_batch": options.max_batch,
            "batch_window_ms": options.batch_window_ms,
            "max_queue": options.max_queue,
        },
        "masm_version": __version__,
    }


def create_app(model: str | Path, options: ServeOptions | None = None) -> FastAPI:
    """The service for the checkpoint directory ``model`` (loaded now, so a bad one fails before serving)."""
    options = options or ServeOptions()
    service = Service(model, options)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPIOffline(
        title="masm detection service",
        version=__version__,
        description="Scores images and videos: P(fake) from a fine-tuned vision transformer.",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_error_handlers(app, service)
    app.include_router(_v1_router(service), prefix="/v1")
    app.mount("/page", StaticFiles(directory=str(STATIC)), name="page")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health", summary="the service is up and how busy it is")
    async def health() -> dict:
        stats = service.batcher.stats
        return {
            "status": "ok",
            "admitted": service.batcher.admitted,
            "max_queue": options.max_queue,
            "served": service.served,
            "refused": service.refused,
            "batches": stats.batches,
            "largest_batch": stats.largest,
            "mean_batch": stats.crops / stats.batches if stats.batches else 0.0,
        }

    return app


def _v1_router(service: Service) -> APIRouter:
    key = service.options.api_key

    def require_key(request: Request) -> None:
        if key is None:
            return
        sent = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if sent is None and auth.lower().startswith("bearer "):
            sent = auth[7:].strip()
        if sent is None or not hmac.compare_digest(sent.encode(), key.encode()):
            raise StarletteHTTPException(
                401, "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)"
            )

    router = APIRouter(dependencies=[Depends(require_key)])

    @router.post(
        "/detect",
        summary="score an uploaded image or video",
        description=(
            "Send the file as the multipart field `file` (or the raw bytes as application/octet-stream). "
            "Answers the JSON of `masm detect`: input, kind, score (P(fake)), label, faces, frames, "
            "frame_scores (videos), error, note; `explain=true` adds an explanation map per scored crop."
        ),
        openapi_extra=UPLOAD_BODY,
        responses={code: ERROR_MODEL for code in (400, 401, 408, 413, 415, 422, 503)},
    )
    async def detect(
        request: Request, explain: bool = Query(False, description="add explanation maps")
    ) -> dict:
        return await service.detect(request, explain)

    @router.get("/model", summary="the model: backbone, method, preprocessing, checksum, limits")
    async def model() -> dict:
        return service.info

    return router


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def refuse(status: int, reason: str, headers: dict | None = None, body: dict | None = None):
        service.refused += 1
        return JSONResponse(body or {"error": reason}, status_code=status, headers=headers)

    @app.exception_handler(UploadError)
    async def upload_error(_request, err: UploadError):
        return refuse(err.status, err.reason)

    @app.exception_handler(_Unscorable)
    async def unscorable(_request, err: _Unscorable):
        return refuse(422, err.result["error"], body=err.result)

    @app.exception_handler(Busy)
    async def busy(_request, err: Busy):
        reason = f"busy: {service.options.max_queue} requests in progress (--max-queue); retry later"
        return refuse(503, reason, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return refuse(err.status_code, " ".join(str(err.detail).split()), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return refuse(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal(_request, err: Exception):
        # The traceback goes to the server's log; the client gets one line.
        log.error("internal error", exc_info=err)
        return JSONResponse({"error": f"internal error ({type(err).__name__})"}, status_code=500)

"""Every setting of ``masm serve`` in one typed place; the command line is built from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from masm.errors import MasmError

API_KEY_ENV = "MASM_SERVE_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """How the service listens, batches, and what it accepts from clients it cannot trust."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(
        default=None,
        metadata={"help": f"key every /v1 request must send (X-API-Key or Bearer); also ${API_KEY_ENV}"},
    )
    # -- batching
    batch_window_ms: float = field(
        default=10.0,
        metadata={"help": "how long a batch waits for more requests while others are still arriving"},
    )
    max_batch: int = field(default=32, metadata={"help": "most crops scored in one forward pass"})
    max_queue: int = field(
        default=64,
        metadata={"help": "most requests admitted at once (receiving, waiting, scored); more get 503"},
    )
    prepare_workers: int = field(
        default=2, metadata={"help": "threads that decode uploads and cut crops, beside the model's"}
    )
    # -- untrusted input
    max_upload_mb: float = field(default=50.0, metadata={"help": "largest upload accepted, in MB"})
    max_pixels: int = field(
        default=40_000_000, metadata={"help": "largest image in pixels (decompression bombs are refused)"}
    )
    max_video_pixels: int = field(default=3840 * 2160, metadata={"help": "largest video frame in pixels"})
    max_video_seconds: float = field(default=300.0, metadata={"help": "longest video accepted, in seconds"})
    max_video_frames: int = field(
        default=9000, metadata={"help": "most frames a video may hold (all are demuxed, most decoded)"}
    )
    frames: int = field(default=16, metadata={"help": "evenly spaced frames scored per video"})
    timeout_s: float = field(default=60.0, metadata={"help": "longest time one request may take, in seconds"})
    # -- scoring
    operating_point: str | None = field(
        default=None,
        metadata={"help": "stored operating point to label at (fpr=0.01, eer; default: the detector's own)"},
    )
    threshold: float | None = field(
        default=None, metadata={"help": "label fake at score >= this number instead of an operating point"}
    )
    faces: bool = field(
        default=True, metadata={"help": "detect and align faces (if the model was trained so)"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda, ...)"})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def exposed(self) -> bool:
        """Whether the service listens beyond this machine."""
        return self.host not in LOOPBACK_HOSTS

    def validate(self) -> None:
        positive = (
            "port",
            "max_batch",
            "max_queue",
            "prepare_workers",
            "max_upload_mb",
            "max_pixels",
            "max_video_pixels",
            "max_video_seconds",
            "max_video_frames",
            "frames",
            "timeout_s",
        )
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise MasmError(f"serve: {', '.join(bad)} must be > 0")
        threshold_ok = self.threshold is None or 0.0 <= self.threshold <= 1.0
        if self.batch_window_ms < 0 or not threshold_ok:
            raise MasmError(
                f"serve: batch window must be >= 0 ms and threshold in [0, 1] "
                f"(got {self.batch_window_ms}, {self.threshold})"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise MasmError("serve: the API key is empty")

    def public(self) -> dict:
        """The settings a client may see (no key)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}

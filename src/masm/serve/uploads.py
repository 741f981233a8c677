"""Receiving an upload from a client the service cannot trust.

The body is streamed to a file with a random name in a private folder (mode 0700, made once per service),
counted as it arrives, so an oversized upload is refused as soon as it passes the limit rather than after
it has filled the disk. Both ``multipart/form-data`` (field ``file``, what browsers and ``curl -F`` send)
and a raw body (``curl --data-binary``) are accepted. The client's filename is kept only as a label for the
answer: it never becomes part of a path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

FILE_FIELD = "file"
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
RAW_TYPES = ("application/octet-stream", "image/", "video/")
# A label longer than this is cut; anything but printable characters is dropped.
MAX_LABEL = 120


class UploadError(Exception):
    """A request the service refuses: ``status`` is the HTTP status, ``reason`` one line for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())


class UploadFolder:
    """The private folder uploads live in while they are scored; each upload is one file, removed after."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="masm-serve-"))  # mkdtemp makes it 0700
        os.chmod(self.path, 0o700)

    def new_file(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.path)  # random name, 0600, never reused
        os.close(fd)
        return Path(name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def files(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.is_dir() else []


def safe_label(filename: str | None) -> str:
    """A display name from a client's filename: the last path component, printable, short."""
    if not filename:
        return "upload"
    name = re.split(r"[\\/]", filename)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:MAX_LABEL] or "upload"


async def receive(request, dest: Path, max_bytes: int) -> str:
    """Write the uploaded file of ``request`` to ``dest``; returns its label. Raises :class:`UploadError`."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    content_type = content_type.decode("latin-1").lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and content_type and not content_type.startswith(RAW_TYPES):
        raise UploadError(
            415,
            f"unsupported Content-Type {content_type!r}: send multipart/form-data with a '{FILE_FIELD}' "
            "field, or the file's bytes as application/octet-stream",
        )
    limit = max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, _too_large(max_bytes))
    with open(dest, "wb") as sink:
        if multipart:
            label = await _receive_multipart(request, sink, params.get(b"boundary"), limit, max_bytes)
        else:
            label = "upload"
            await _receive_raw(request, sink, max_bytes)
    if dest.stat().st_size == 0:
        raise UploadError(400, "empty upload (0 bytes): neither an image nor a video")
    return label


async def _chunks(request):
    """The body as it arrives; a client that goes away mid-upload is a refused request, not a crash."""
    from starlette.requests import ClientDisconnect

    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise UploadError(400, "the client went away before the upload was complete") from None


async def _receive_raw(request, sink, max_bytes: int) -> None:
    received = 0
    async for chunk in _chunks(request):
        received += len(chunk)
        if received > max_bytes:
            raise UploadError(413, _too_large(max_bytes))
        sink.write(chunk)  # local disk, chunks of at most 64 KiB: not worth a thread hop


async def _receive_multipart(request, sink, boundary: bytes | None, limit: int, max_bytes: int) -> str:
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    part = _PartReader(sink, max_bytes)
    parser = MultipartParser(boundary, part.callbacks())
    received = 0
    try:
        async for chunk in _chunks(request):
            received += len(chunk)
            if received > limit:
                raise UploadError(413, _too_large(max_bytes))
            parser.write(chunk)
    except MultipartParseError as err:
        raise UploadError(400, f"malformed multipart body ({err})") from None
    if not part.found:
        raise UploadError(400, f"no file in the request: send it as the multipart field '{FILE_FIELD}'")
    if not part.ended:
        raise UploadError(400, "the multipart body ended before the file did (truncated upload)")
    return safe_label(part.filename)


class _PartReader:
    """Callbacks of python-multipart's streaming parser: the first part named ``file`` goes to ``sink``."""

    def __init__(self, sink, max_bytes: int):
        self.sink = sink
        self.max_bytes = max_bytes
        self.found = False  # a ``file`` part was seen
        self.ended = False  # ... and its end
        self.filename: str | None = None
        self._writing = False
        self._written = 0
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if not self.found and params.get(b"name") == FILE_FIELD.encode():
            self.found = self._writing = True
            raw = params.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._writing:
            self._written += end - start
            if self._written > self.max_bytes:
                raise UploadError(413, _too_large(self.max_bytes))
            self.sink.write(data[start:end])

    def _part_end(self) -> None:
        if self._writing:
            self._writing = False
            self.ended = True


def _too_large(max_bytes: int) -> str:
    return f"upload larger than the limit of {max_bytes / 1e6:g} MB (--max-upload-mb)"

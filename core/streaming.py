"""Streamed downloads that never hold the whole body in memory, under ASGI (daphne) and WSGI.

Under ASGI Django reads a *synchronous* streaming body to its end before sending anything (it
cannot iterate blocking code on the event loop), so a 10 GB log or model zip would be loaded into
memory. :func:`streamed_download` hands daphne an asynchronous iterator that pulls the blocking
generator one piece at a time in a worker thread instead.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from django.http import StreamingHttpResponse


def file_chunks(path: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            yield block


async def _async_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    from asgiref.sync import sync_to_async

    done = object()
    step = sync_to_async(next, thread_sensitive=False)
    while (chunk := await step(chunks, done)) is not done:
        if chunk:
            yield chunk  # type: ignore[misc]


def streamed_download(
    request: Any, chunks: Iterator[bytes], *, content_type: str, filename: str
) -> StreamingHttpResponse:
    """An attachment streamed from ``chunks``: asynchronously under ASGI, synchronously under WSGI."""
    from django.core.handlers.asgi import ASGIRequest

    is_asgi = isinstance(getattr(request, "_request", request), ASGIRequest)
    response = StreamingHttpResponse(_async_chunks(chunks) if is_asgi else chunks, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- download ---------------------------------------------------------------------------------------
class _Pipe:
    """A write-only sink for :class:`zipfile.ZipFile` that hands out what was written so far."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        if data:
            self.chunks.append(bytes(data))
            self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def zip_chunks(folder: Path, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A zip of ``folder`` produced piece by piece (constant memory, any size: ZIP64 where needed).

    Weights do not compress, so files are stored; symlinks are skipped (nothing outside the folder
    is ever read)."""
    pipe = _Pipe()
    root = folder.name
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                arcname = f"{root}/{path.relative_to(folder).as_posix()}"
                info = zipfile.ZipInfo.from_file(path, arcname)
                info.compress_type = zipfile.ZIP_STORED
                big = info.file_size > 0x7FFF0000
                with path.open("rb") as source, archive.open(info, "w", force_zip64=big) as target:
                    while block := source.read(chunk_size):
                        target.write(block)
                        if pipe.written:
                            yield pipe.take()
                yield pipe.take()
    yield pipe.take()


def zip_stream_response(request: Any, folder: Path, *, filename: str) -> StreamingHttpResponse:
    """A streamed zip download of ``folder`` (never held in memory)."""
    return streamed_download(request, (c for c in zip_chunks(folder) if c), content_type="application/zip",
                             filename=filename)

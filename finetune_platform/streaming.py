"""Streamed downloads that never hold the whole body in memory, under ASGI (daphne) and WSGI.

Under ASGI Django reads a *synchronous* streaming body to its end before sending anything (it
cannot iterate blocking code on the event loop), so a 10 GB log or model zip would be loaded into
memory. :func:`streamed_download` hands daphne an asynchronous iterator that pulls the blocking
generator one piece at a time in a worker thread instead.
"""

from __future__ import annotations

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

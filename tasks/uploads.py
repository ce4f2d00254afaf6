"""The dataset size limit, enforced while an upload streams in (docs/security.md, M8).

Django writes a multipart upload to a temporary file before a view sees it, so a size check in the
view or the service comes only after the whole body was received and stored. The two dataset upload
views (the page and ``POST /api/finetuning/datasets/``) put :class:`DatasetUploadLimit` in front of
Django's own upload handlers instead:

* a body whose ``Content-Length`` already passes the limit is refused when its first file part
  begins: the small fields in front of it (the page's CSRF token) are read, the file is not, and the
  rest of the body is left unread (``StopUpload(connection_reset=True)``);
* a file that passes the limit while it streams is dropped at once (``SkipFile``: what was stored
  of it is deleted). The ``Content-Length`` check leaves less than :data:`FORM_ALLOWANCE` unread
  behind it, so the parser reads that rest and the browser gets the answer; should more be left, the
  upload stops without reading it.

The view then answers a 400 that names the ``file`` field (:func:`too_large_message`).

Under daphne, Django's ASGI handler receives the whole body before any of this runs:
:class:`UploadBodyCap` (ASGI middleware) answers an upload whose ``Content-Length`` is too large
before its body is received.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile, StopUpload
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import escape
from django.utils.translation import gettext as _

#: Room in a dataset upload's body for everything but the file: the other fields (name,
#: description, the CSRF token) and the multipart framing.
FORM_ALLOWANCE = 64 * 1024


def dataset_limit_bytes() -> int:
    return settings.FINETUNE_MAX_DATASET_MB * 1024 * 1024


def too_large_message() -> str:
    """What a user is told about a dataset over the limit (the page and the API, streamed or not)."""
    return _("the file is larger than %(mb)s MB") % {"mb": settings.FINETUNE_MAX_DATASET_MB}


def declared_too_large(request: HttpRequest) -> bool:
    """The request's ``Content-Length`` is more than a dataset upload may need."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False  # Django's parser refuses a malformed length itself
    return length > dataset_limit_bytes() + FORM_ALLOWANCE


class DatasetUploadLimit(FileUploadHandler):
    """An upload handler that refuses a dataset over ``FINETUNE_MAX_DATASET_MB`` as it streams.

    It must come first in ``request.upload_handlers`` (see :meth:`install`) so that the handlers that
    store the file never see a byte past the limit. ``refused`` tells the view to answer a 400.
    """

    def __init__(self, request: HttpRequest | None = None, *, limit: int | None = None) -> None:
        super().__init__(request)
        self.limit = dataset_limit_bytes() if limit is None else limit
        self.refused = False
        self._body_length = 0
        self._body_too_large = False

    @classmethod
    def install(cls, request: HttpRequest) -> DatasetUploadLimit:
        """Put the limit in front of the request's upload handlers. Call it before anything reads
        ``request.POST``/``FILES`` (for a page: in a ``csrf_exempt`` view that then calls its
        ``csrf_protect`` part; for DRF: before the request is authenticated or parsed)."""
        handler = cls(request)
        request.upload_handlers.insert(0, handler)
        return handler

    def handle_raw_input(
        self, input_data: Any, META: Any, content_length: int, boundary: Any, encoding: str | None = None
    ) -> None:
        self._body_length = content_length
        # Not refused here: the fields in front of the file (the CSRF token) are still read.
        self._body_too_large = content_length > self.limit + FORM_ALLOWANCE
        return None

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        if self._body_too_large:
            self.refused = True
            raise StopUpload(connection_reset=True)  # nothing of the file is read

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) <= self.limit:
            return raw_data
        self.refused = True
        if self._body_length - (start + len(raw_data)) > FORM_ALLOWANCE:
            raise StopUpload(connection_reset=True)
        raise SkipFile  # the parser deletes what was stored and reads the small rest of the body

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler (memory or temporary file) returns the file


# --- before Django: the ASGI server ------------------------------------------------------------------
@functools.cache
def _upload_paths() -> frozenset[str]:
    return frozenset({reverse("dataset_upload"), reverse("dataset-list")})


class UploadBodyCap:
    """ASGI middleware for the HTTP application (``finetune_platform/asgi.py``).

    Django's ASGI handler receives a request's whole body, into a temporary file, before any view
    or upload handler runs. A ``POST`` to a dataset upload URL whose ``Content-Length`` is more than
    a dataset may need is answered here instead, 400 naming ``file``, before its body is received;
    one without a ``Content-Length`` (a chunked body, which Django would store whole and then not
    parse) is refused with 411. Everything else goes to ``app`` untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in _upload_paths():
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            length: int | None = int(headers[b"content-length"])
        except (KeyError, ValueError):
            length = None
        if length is not None and length <= dataset_limit_bytes() + FORM_ALLOWANCE:
            await self.app(scope, receive, send)
            return
        if length is None:
            status, text = 411, _("the upload must say its size (a Content-Length header)")
        else:
            status, text = 400, too_large_message()
        if scope["path"] == reverse("dataset-list"):
            body, content_type = json.dumps({"file": [text]}).encode(), b"application/json"
        else:
            page = f'<!doctype html><p>{escape(text)}</p><p><a href="{escape(scope["path"])}">&larr;</a></p>'
            body, content_type = page.encode(), b"text/html; charset=utf-8"
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})

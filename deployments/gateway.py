"""The OpenAI-compatible gateway: ``/api/deployments/<id>/v1/models`` and ``…/v1/chat/completions``.

A user points the standard ``openai`` client at ``base_url=<platform>/api/deployments/<id>/v1``
with ``api_key=<their API token>``; the client sends ``Authorization: Bearer <token>``. The views
are async (the platform runs under daphne): they authenticate the token themselves (no session, so
no CSRF), resolve the deployment through ``for_user`` (another user's deployment is a 404), and
forward to ``http://127.0.0.1:<port>/v1/…`` with the deployment's internal key, which never leaves
the server. Streamed answers (``"stream": true``) are relayed chunk by chunk as they arrive.
Every answered request is counted, with its tokens (``usage`` of the answer, or of the last
streamed chunk that carries one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.services import api_token_authenticate
from deployments.command import HOST
from deployments.models import Deployment, DeploymentStatus
from deployments.selectors import deployment_list
from deployments.services import deployment_record_usage

logger = logging.getLogger(__name__)

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _client() -> httpx.AsyncClient:
    """One connection pool per event loop (daphne has one; keep-alive saves a connect per request)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.FINETUNE_DEPLOY_GATEWAY_TIMEOUT_SECONDS, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            trust_env=False,  # never route 127.0.0.1 through an HTTP proxy from the environment
        )
        _clients[loop] = client
    return client


def openai_error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 **headers: str) -> JsonResponse:
    """An error body in the shape OpenAI clients parse (``error.message`` is what they show)."""
    response = JsonResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                            status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _unauthorized(message: str) -> JsonResponse:
    return openai_error(401, message, code="invalid_api_key", WWW_Authenticate='Bearer realm="deployments"')


def _token_and_deployment(raw: str, pk: int) -> tuple[bool, Deployment | None]:
    """One database round (one thread hop): is the token valid, and the token user's deployment."""
    token = api_token_authenticate(raw=raw)
    if token is None:
        return False, None
    return True, deployment_list(user=token.user).filter(pk=pk).first()


def _bearer(request: HttpRequest) -> str | JsonResponse:
    """The raw token of ``Authorization: Bearer <token>`` (or ``Token <token>``), or a 401."""
    parts = request.headers.get("Authorization", "").split()
    if not parts:
        return _unauthorized("Missing API key: send your platform API token as 'Authorization: Bearer <token>'.")
    if len(parts) != 2 or parts[0].lower() not in ("bearer", "token"):
        return _unauthorized("Invalid Authorization header: expected 'Bearer <token>'.")
    return parts[1]


def _usage(payload: Any) -> tuple[int, int] | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None


class _SseUsage:
    """Follows an SSE byte stream and keeps the last ``usage`` seen (swift puts the running totals
    in every chunk; OpenAI servers put them in a final chunk when asked)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.usage: tuple[int, int] | None = None
        self.chunks = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                body = line[5:].strip()
                if body == b"[DONE]":
                    self.done = True
                    continue
                self.chunks += 1
                try:
                    found = _usage(json.loads(body))
                except ValueError:
                    continue
                if found is not None:
                    self.usage = found
        if len(self._buffer) > 1 << 20:  # a malformed stream must not grow memory without bound
            self._buffer = b""


async def proxy(deployment: Deployment, *, endpoint: str, payload: dict[str, Any] | None) -> HttpResponse:
    """Forward one request to the deployment's model server (``endpoint``: ``models`` or
    ``chat/completions``) and relay the answer; streamed when ``payload["stream"]`` is true."""
    if deployment.status != DeploymentStatus.RUNNING or not deployment.port or not deployment.api_key:
        return openai_error(503, f"Deployment {deployment.pk} is {deployment.status}, not running.",
                            kind="service_unavailable", code="deployment_not_running")
    url = f"http://{HOST}:{deployment.port}/v1/{endpoint}"
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    client = _client()
    try:
        if payload is None:
            upstream = await client.get(url, headers=headers)
            await deployment_record_usage(deployment_id=deployment.pk)
            return HttpResponse(upstream.content, status=upstream.status_code,
                                content_type=upstream.headers.get("content-type", "application/json"))
        request = client.build_request("POST", url, headers=headers, json=payload)
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        logger.warning("gateway: deployment %s did not answer: %s", deployment.pk, exc)
        return openai_error(502, f"The model server of deployment {deployment.pk} did not answer "
                            f"({type(exc).__name__}).", kind="bad_gateway", code="upstream_unavailable")
    content_type = upstream.headers.get("content-type", "application/json")
    if not payload.get("stream") or upstream.status_code != 200 or "text/event-stream" not in content_type:
        try:
            body = await upstream.aread()
        finally:
            await upstream.aclose()
        try:
            usage = _usage(json.loads(body)) if upstream.status_code == 200 else None
        except ValueError:
            usage = None
        prompt, completion = usage or (0, 0)
        await deployment_record_usage(deployment_id=deployment.pk, prompt_tokens=prompt, completion_tokens=completion)
        return HttpResponse(body, status=upstream.status_code, content_type=content_type)

    async def relay() -> AsyncIterator[bytes]:
        seen = _SseUsage()
        counted = False

        async def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                prompt, completion = seen.usage or (0, seen.chunks)
                await deployment_record_usage(deployment_id=deployment.pk, prompt_tokens=prompt,
                                              completion_tokens=completion)

        try:
            async for chunk in upstream.aiter_raw():
                seen.feed(chunk)
                if seen.done:
                    await count()  # before the client sees the end, so its next look at the counts is right
                yield chunk
        finally:
            await upstream.aclose()
            await count()  # a stream that ended early (client gone, server died) still counts

    response = StreamingHttpResponse(relay(), status=200, content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
    return response


def parse_chat_body(request: HttpRequest, deployment: Deployment) -> dict[str, Any] | JsonResponse:
    """The chat request as a JSON object (the served model name filled in when absent)."""
    try:
        payload = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        return openai_error(400, "The request body is not valid JSON.")
    if not isinstance(payload, dict):
        return openai_error(400, "The request body must be a JSON object with 'messages'.")
    if not isinstance(payload.get("messages"), list) or not payload["messages"]:
        return openai_error(400, "'messages' must be a non-empty list.", code="invalid_messages")
    payload.setdefault("model", deployment.served_model_name)
    return payload


async def _resolve(request: HttpRequest, pk: int) -> Deployment | JsonResponse:
    """Authenticate the token, then find the deployment among the token user's (404 otherwise)."""
    raw = _bearer(request)
    if isinstance(raw, JsonResponse):
        return raw
    valid, deployment = await sync_to_async(_token_and_deployment)(raw, pk)
    if not valid:
        return _unauthorized("Invalid or revoked API token.")
    if deployment is None:
        return openai_error(404, f"Deployment {pk} does not exist.", code="deployment_not_found")
    return deployment


@csrf_exempt  # token authentication only: a browser's cookies are never looked at here
async def models(request: HttpRequest, pk: int) -> HttpResponse:
    """``GET /api/deployments/<id>/v1/models``"""
    if request.method != "GET":
        return openai_error(405, "Use GET.")
    deployment = await _resolve(request, pk)
    if isinstance(deployment, JsonResponse):
        return deployment
    return await proxy(deployment, endpoint="models", payload=None)


@csrf_exempt  # token authentication only: a browser's cookies are never looked at here
async def chat_completions(request: HttpRequest, pk: int) -> HttpResponse:
    """``POST /api/deployments/<id>/v1/chat/completions`` (``"stream": true`` streams SSE)."""
    if request.method != "POST":
        return openai_error(405, "Use POST.")
    deployment = await _resolve(request, pk)
    if isinstance(deployment, JsonResponse):
        return deployment
    payload = parse_chat_body(request, deployment)
    if isinstance(payload, JsonResponse):
        return payload
    return await proxy(deployment, endpoint="chat/completions", payload=payload)

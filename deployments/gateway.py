"""The OpenAI-compatible gateway: ``/api/deployments/<id>/v1/models`` and ``…/v1/chat/completions``.

A user points the standard ``openai`` client at ``base_url=<platform>/api/deployments/<id>/v1``
with ``api_key=<their API token>``; the client sends ``Authorization: Bearer <token>``. The views
are async (the platform runs under daphne): they authenticate the token themselves (no session, so
no CSRF), resolve the deployment through ``for_user`` (another user's deployment is a 404), and
forward to ``http://<address of the deployment's host>:<port>/v1/…`` with the deployment's internal
key, which never leaves the server. Streamed answers (``"stream": true``) are relayed event by event
as they arrive. Every answered request is counted, with its tokens (``usage`` of the answer, or of the
last streamed chunk that carries one).

It forwards only what it understands, within bounds (docs/security.md, H1, M2, M10):

* a chat request is rebuilt from an allow-list (:mod:`deployments.chat_request`): no key, media
  reference or number swift could misuse; a body over ``FINETUNE_GATEWAY_MAX_BODY_KB`` is a 413;
* an answer over ``FINETUNE_GATEWAY_MAX_ANSWER_MB`` is a 502 (a stream is cut there), never buffered
  whole;
* at most ``FINETUNE_GATEWAY_USER_CONCURRENCY`` requests per user are in flight in one process (429
  beyond), and a request waits at most ``FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS`` for a connection;
* a stream re-checks its token every ``FINETUNE_SOCKET_RECHECK_SECONDS`` and ends when it was revoked
  or its user deactivated;
* a server that answers at the deployment's address for another deployment is a 502.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import weakref
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.services import api_token_authenticate
from deployments.chat_request import ChatRequestError, chat_request_clean
from deployments.command import http_host
from deployments.models import Deployment, DeploymentStatus
from deployments.relay import Relay, StillAllowed, answer_usage, slots
from deployments.selectors import deployment_gateway_list
from deployments.services import deployment_record_usage

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _client() -> httpx.AsyncClient:
    """One connection pool per event loop (daphne has one; keep-alive saves a connect per request).
    Waiting for a free connection is short (``FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS``): a full pool
    answers 503 at once instead of holding the caller for the whole answer timeout."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.FINETUNE_DEPLOY_GATEWAY_TIMEOUT_SECONDS, connect=5.0,
                                  pool=settings.FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            trust_env=False,  # never route the model servers through an HTTP proxy from the environment
        )
        _clients[loop] = client
    return client


def openai_error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, **headers: str) -> JsonResponse:
    """An error body in the shape OpenAI clients parse (``error.message`` is what they show)."""
    response = JsonResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _unauthorized(message: str) -> JsonResponse:
    return openai_error(401, message, code="invalid_api_key", WWW_Authenticate='Bearer realm="deployments"')


def _bad_gateway(message: str, code: str) -> JsonResponse:
    return openai_error(502, message, kind="bad_gateway", code=code)


# --- the request --------------------------------------------------------------------------------------
def _body_limit() -> int:
    return settings.FINETUNE_GATEWAY_MAX_BODY_KB * 1024


def _too_large() -> JsonResponse:
    return openai_error(413, f"The request body is larger than {settings.FINETUNE_GATEWAY_MAX_BODY_KB} KiB "
                        "(FINETUNE_GATEWAY_MAX_BODY_KB).", code="request_too_large")


def declared_too_large(request: HttpRequest) -> JsonResponse | None:
    """A 413 when the request announces a body over the cap (checked before anything reads it)."""
    try:
        declared = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        return openai_error(400, "The Content-Length header is not a number.")
    return _too_large() if declared > _body_limit() else None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_chat_body(request: HttpRequest, deployment: Deployment) -> dict[str, Any] | JsonResponse:
    """The chat request to forward (:func:`deployments.chat_request.chat_request_clean`: only what
    swift understands, checked; the served model name filled in when absent), or the error answer:
    413 for a body over ``FINETUNE_GATEWAY_MAX_BODY_KB``, 400 naming the field otherwise."""
    refused = declared_too_large(request)
    if refused is not None:
        return refused
    limit = _body_limit()
    body = request.read(limit + 1)  # never more than the cap, whatever Content-Length said
    if len(body) > limit:
        return _too_large()
    try:
        payload = json.loads(body or b"null", parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return openai_error(400, "The request body is not valid JSON (NaN and Infinity are not JSON numbers).")
    try:
        return chat_request_clean(payload, default_model=deployment.served_model_name,
                                  max_image_bytes=settings.FINETUNE_GATEWAY_MAX_IMAGE_KB * 1024)
    except ChatRequestError as exc:
        return openai_error(400, exc.message, param=exc.param, code=exc.code)


# --- where the model server is ---------------------------------------------------------------------
def _unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_unspecified  # 0.0.0.0 or ::
    except ValueError:
        return False


def upstream_base(deployment: Deployment) -> str | None:
    """``http://<address>:<port>/v1`` of the deployment's model server: the address its run's host
    recorded (``Host.address``, read with the deployment as ``host_address``). A host that recorded
    none (or a listen-everywhere one) is reachable at 127.0.0.1 only from itself: then only when it is
    this process's ``FINETUNE_HOST``; None otherwise."""
    address = (getattr(deployment, "host_address", None) or "").strip()
    if not address or _unspecified(address):
        host = deployment.run.host if deployment.run is not None else deployment.host
        if host != settings.FINETUNE_HOST:
            return None
        address = "127.0.0.1"
    return f"http://{http_host(address)}:{deployment.port}/v1"


async def _read_capped(upstream: httpx.Response) -> bytes | None:
    """The whole (non-streamed) answer, or None when it is over ``FINETUNE_GATEWAY_MAX_ANSWER_MB``
    (read no further than that)."""
    limit = settings.FINETUNE_GATEWAY_MAX_ANSWER_MB * 2**20
    declared = upstream.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in upstream.aiter_raw():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _answered_for_another(deployment: Deployment, endpoint: str, status: int, body: bytes) -> bool:
    """Whether the server at the deployment's address is not this deployment's model server: its
    ``/v1/models`` does not list the served name, or it refuses the deployment's key."""
    if endpoint == "models":
        if status != 200:
            return False
        try:
            names = [m.get("id") for m in json.loads(body).get("data", [])]
        except (ValueError, AttributeError, TypeError):
            return True
        return deployment.served_model_name not in names
    return status in (400, 401, 403) and b"API key error" in body


async def proxy(deployment: Deployment, *, endpoint: str, payload: dict[str, Any] | None, user_id: int,
                still_allowed: StillAllowed | None = None) -> HttpResponse:
    """Forward one request to the deployment's model server (``endpoint``: ``models`` or
    ``chat/completions``; ``payload`` already checked by :func:`parse_chat_body`) and relay the
    answer; streamed when ``payload["stream"]`` is true. Counts against ``user_id``'s requests in
    flight; a stream asks ``still_allowed`` as it goes."""
    if deployment.status != DeploymentStatus.RUNNING or not deployment.port or not deployment.api_key:
        return openai_error(503, f"Deployment {deployment.pk} is {deployment.status}, not running.",
                            kind="service_unavailable", code="deployment_not_running")
    base = upstream_base(deployment)
    if base is None:
        host = deployment.run.host if deployment.run is not None else deployment.host
        return openai_error(503, f"Deployment {deployment.pk} runs on host {host}, whose address is not known: its "
                            "worker records FINETUNE_HOST_ADDRESS when it starts. Restart that worker.",
                            kind="service_unavailable", code="host_address_unknown")
    slot = slots.take(user_id)
    if slot is None:
        return openai_error(429, f"Too many requests in flight: at most {settings.FINETUNE_GATEWAY_USER_CONCURRENCY} "
                            "per user at a time (FINETUNE_GATEWAY_USER_CONCURRENCY). Retry when one has finished.",
                            kind="rate_limit_error", code="too_many_requests", Retry_After=str(RETRY_AFTER_SECONDS))
    handed_over = False  # to the relay of a streamed answer, which releases both
    try:
        # identity: what is relayed is what was counted against the caps (no compressed bombs).
        headers = {"Authorization": f"Bearer {deployment.api_key}", "Accept-Encoding": "identity"}
        client = _client()
        request = client.build_request("GET" if payload is None else "POST", f"{base}/{endpoint}", headers=headers,
                                       json=payload)
        try:
            upstream = await client.send(request, stream=True)
        except httpx.PoolTimeout:
            return openai_error(503, "The gateway is busy: no connection to the model server came free within "
                                f"{settings.FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS:g} s. Retry shortly.",
                                kind="service_unavailable", code="gateway_busy", Retry_After=str(RETRY_AFTER_SECONDS))
        except httpx.HTTPError as exc:
            logger.warning("gateway: deployment %s did not answer: %s", deployment.pk, exc)
            return _bad_gateway(f"The model server of deployment {deployment.pk} did not answer "
                                f"({type(exc).__name__}).", "upstream_unavailable")
        try:
            content_type = upstream.headers.get("content-type", "application/json")
            if (payload is not None and payload.get("stream") and upstream.status_code == 200
                    and "text/event-stream" in content_type):
                relay = Relay(upstream, deployment_id=deployment.pk, slot=slot, still_allowed=still_allowed)
                handed_over = True
                response = StreamingHttpResponse(relay, status=200, content_type=content_type)
                response["Cache-Control"] = "no-cache"
                response["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
                return response
            try:
                body = await _read_capped(upstream)
            except httpx.HTTPError as exc:
                return _bad_gateway(f"The model server's answer broke off ({type(exc).__name__}).",
                                    "upstream_unavailable")
        finally:
            if not handed_over:
                await upstream.aclose()
    finally:
        if not handed_over:
            slot.release()
    if body is not None and _answered_for_another(deployment, endpoint, upstream.status_code, body):
        logger.warning("gateway: %s answered for another deployment than %s", base, deployment.pk)
        return _bad_gateway(f"Deployment {deployment.pk}'s address was answered by a different server; the "
                            "deployment may have stopped. Try again, or restart the deployment.", "wrong_upstream")
    usage = None
    if body is not None and upstream.status_code == 200 and payload is not None:
        try:
            usage = answer_usage(json.loads(body))
        except ValueError:
            usage = None
    prompt, completion = usage or (0, 0)
    await deployment_record_usage(deployment_id=deployment.pk, prompt_tokens=prompt, completion_tokens=completion)
    if body is None:
        return _bad_gateway(f"The model server's answer is larger than {settings.FINETUNE_GATEWAY_MAX_ANSWER_MB} MB "
                            "(FINETUNE_GATEWAY_MAX_ANSWER_MB); ask for fewer tokens or stream the answer.",
                            "answer_too_large")
    return HttpResponse(body, status=upstream.status_code, content_type=content_type)


# --- the views ----------------------------------------------------------------------------------------
def _bearer(request: HttpRequest) -> str | JsonResponse:
    """The raw token of ``Authorization: Bearer <token>`` (or ``Token <token>``), or a 401."""
    parts = request.headers.get("Authorization", "").split()
    if not parts:
        return _unauthorized("Missing API key: send your platform API token as 'Authorization: Bearer <token>'.")
    if len(parts) != 2 or parts[0].lower() not in ("bearer", "token"):
        return _unauthorized("Invalid Authorization header: expected 'Bearer <token>'.")
    return parts[1]


def _token_and_deployment(raw: str, pk: int) -> tuple[int | None, Deployment | None]:
    """One database round (one thread hop): the valid token's user id, and that user's deployment
    with what the gateway needs (its run, its host's address)."""
    token = api_token_authenticate(raw=raw)
    if token is None:
        return None, None
    return token.user_id, deployment_gateway_list(user=token.user).filter(pk=pk).first()


def _token_still_valid(raw: str) -> bool:
    return api_token_authenticate(raw=raw) is not None


def token_check(raw: str) -> StillAllowed:
    """What a stream asks as it goes: is the token still active and its user still active."""
    check = sync_to_async(_token_still_valid)

    async def still_allowed() -> bool:
        return await check(raw)

    return still_allowed


async def _resolve(request: HttpRequest, pk: int) -> tuple[Deployment, int, StillAllowed] | JsonResponse:
    """Authenticate the token, then find the deployment among the token user's (404 otherwise)."""
    raw = _bearer(request)
    if isinstance(raw, JsonResponse):
        return raw
    user_id, deployment = await sync_to_async(_token_and_deployment)(raw, pk)
    if user_id is None:
        return _unauthorized("Invalid or revoked API token.")
    if deployment is None:
        return openai_error(404, f"Deployment {pk} does not exist.", code="deployment_not_found")
    return deployment, user_id, token_check(raw)


@csrf_exempt  # token authentication only: a browser's cookies are never looked at here
async def models(request: HttpRequest, pk: int) -> HttpResponse:
    """``GET /api/deployments/<id>/v1/models``"""
    if request.method != "GET":
        return openai_error(405, "Use GET.")
    resolved = await _resolve(request, pk)
    if isinstance(resolved, JsonResponse):
        return resolved
    deployment, user_id, _ = resolved
    return await proxy(deployment, endpoint="models", payload=None, user_id=user_id)


@csrf_exempt  # token authentication only: a browser's cookies are never looked at here
async def chat_completions(request: HttpRequest, pk: int) -> HttpResponse:
    """``POST /api/deployments/<id>/v1/chat/completions`` (``"stream": true`` streams SSE)."""
    if request.method != "POST":
        return openai_error(405, "Use POST.")
    refused = declared_too_large(request)  # before any database work
    if refused is not None:
        return refused
    resolved = await _resolve(request, pk)
    if isinstance(resolved, JsonResponse):
        return resolved
    deployment, user_id, still_allowed = resolved
    payload = parse_chat_body(request, deployment)
    if isinstance(payload, JsonResponse):
        return payload
    return await proxy(deployment, endpoint="chat/completions", payload=payload, user_id=user_id,
                       still_allowed=still_allowed)

"""The gateway forwards only what it understands (docs/security.md, H1, M2, M10): the request
allow-list, swift's media switched off, size caps on the request and the answer, a per-user limit
on requests in flight (and no slot or connection left behind by a client that leaves), the host's
address instead of 127.0.0.1, streams that end when their token is revoked, and the playground
held to the same rules.

Most tests put a small fake model server (:class:`Upstream`, a thread in this process) behind a
deployment row, so each behaviour of the model server can be staged; the end-to-end ones run the
fake ``swift deploy`` through the platform, and one the real ``swift deploy``."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import time
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.test import AsyncClient

from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke
from core.swift_cli.env import LaunchError
from deployments import gateway, relay, services
from deployments.chat_request import ChatRequestError, chat_request_clean
from deployments.command import build_argv, build_env
from deployments.models import Deployment, DeploymentStatus
from gpus.inventory import Discovery
from gpus.models import Host, Run, RunStatus
from gpus.services import WorkerIdentity, host_announce, host_claim
from tests.conftest import announce_host, wait_for
from tests.deployments.conftest import Runners, kill_leftovers, wait_status

pytestmark = pytest.mark.timeout(180)
MESSAGES = [{"role": "user", "content": "what color is the dog"}]
KEY = "k" * 64
# The smallest valid PNG (1×1, transparent).
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5E"
                       "rkJggg==")
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


# --- a fake model server -------------------------------------------------------------------------------
class Upstream:
    """A model server answering like ``swift deploy``, whose answers the test stages: ``mode`` is
    ``json`` (a completion), ``big`` (``answer_bytes`` of JSON, with or without Content-Length),
    ``stream`` (``events`` SSE events of ``event_bytes`` each, ``delay`` apart, ``pause`` after the
    first) or ``key_error`` (what swift says to a wrong key). It records each request body, and
    counts the streams whose client went away while it was still sending."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, names: tuple[str, ...] = ("colors",)) -> None:
        self.names = names
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.finished_streams = 0
        self.mode = "json"
        self.answer_bytes = 0
        self.content_length = True
        self.events, self.event_bytes, self.delay, self.pause = 5, 10, 0.0, 0.0
        self.server = ThreadingHTTPServer((address, port), self._handler())
        self.server.daemon_threads = True
        self.address, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                data = [{"id": name, "object": "model"} for name in upstream.names]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {KEY}" or upstream.mode == "key_error":
                    return self._send(400, b'{"message": "API key error", "object": "error"}')
                upstream.requests.append(json.loads(body))
                if upstream.mode == "big":
                    answer = b'{"pad": "' + b"x" * upstream.answer_bytes + b'"}'
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    if upstream.content_length:
                        self.send_header("content-length", str(len(answer)))
                    else:
                        self.send_header("connection", "close")
                    self.end_headers()
                    self.wfile.write(answer)
                    return None
                if upstream.mode == "stream":
                    return self._stream()
                usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
                answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a dog"},
                                       "finish_reason": "stop"}], "usage": usage, "model": "colors"}
                return self._send(200, json.dumps(answer).encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(upstream.events):
                        event = {"choices": [{"index": 0, "delta": {"content": "x" * upstream.event_bytes}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": i + 1}}
                        self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                        time.sleep(upstream.pause if i == 0 and upstream.pause else upstream.delay)
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                    upstream.finished_streams += 1
                except OSError:  # the gateway closed the connection
                    upstream.disconnects += 1
                    self.close_connection = True

        return Handler


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def serve(owner: User, upstream: Upstream, *, host: str | None = None, address: str | None = "127.0.0.1",
          name: str = "colors") -> Deployment:
    """A running deployment row whose model server is ``upstream``, on ``host`` (this process's
    FINETUNE_HOST by default), which recorded ``address`` (None: no host row at all)."""
    host = host or settings.FINETUNE_HOST
    if address is not None:
        Host.objects.update_or_create(name=host, defaults={"address": address})
    run = Run.objects.create(kind="deploy", subject_id=0, owner=owner, host=host, status=RunStatus.RUNNING)
    deployment = Deployment.objects.create(owner=owner, name=name, served_model_name=name, host=host, run=run,
                                           status=DeploymentStatus.RUNNING, port=upstream.port, api_key=KEY)
    Run.objects.filter(pk=run.pk).update(subject_id=deployment.pk)
    return deployment


@pytest.fixture
def served(alice: User, upstream: Upstream) -> Deployment:
    return serve(alice, upstream)


def token(user: User, name: str = "gateway") -> str:
    return api_token_create(user=user, name=name)[1]


def chat_path(deployment: Deployment) -> str:
    return f"/api/deployments/{deployment.pk}/v1/chat/completions"


def post(deployment: Deployment, raw: str, body: Any) -> tuple[int, dict[str, str], bytes]:
    """One chat request through the real async view; a streamed answer is read to its end."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        response = await AsyncClient().post(chat_path(deployment), data=data, content_type="application/json",
                                            headers={"Authorization": f"Bearer {raw}"})
        if response.streaming:
            content = b"".join([chunk async for chunk in response.streaming_content])
        else:
            content = response.content
        return response.status_code, dict(response.headers), content

    return async_to_sync(go)()


class Caller:
    """An async client that sends ``raw`` as its bearer token with every request (Django's
    ``AsyncClient(headers=…)`` drops them)."""

    def __init__(self, raw: str) -> None:
        self.client, self.headers = AsyncClient(), {"Authorization": f"Bearer {raw}"}

    async def post(self, path: str, *, data: str, content_type: str = "application/json") -> Any:
        return await self.client.post(path, data=data, content_type=content_type, headers=self.headers)

    async def get(self, path: str) -> Any:
        return await self.client.get(path, headers=self.headers)


def events(body: bytes) -> list[str]:
    return [e[len("data: "):] for e in body.decode().split("\n\n") if e.startswith("data: ")]


def error_of(content: bytes) -> dict[str, Any]:
    return json.loads(content)["error"]


@pytest.fixture(autouse=True)
def _no_slots_left() -> Iterator[None]:
    """Every test ends with no request in flight: a slot left held is a leak."""
    yield
    left, relay.slots._counts = relay.slots._counts, {}
    assert left == {}


# --- 1. the request allow-list --------------------------------------------------------------------------
def clean(payload: dict[str, Any], max_image_bytes: int = 4096 * 1024) -> dict[str, Any]:
    return chat_request_clean(payload, default_model="colors", max_image_bytes=max_image_bytes)


def refused(payload: Any, max_image_bytes: int = 4096 * 1024) -> ChatRequestError:
    with pytest.raises(ChatRequestError) as caught:
        chat_request_clean(payload, default_model="colors", max_image_bytes=max_image_bytes)
    return caught.value


def test_only_what_swift_understands_is_forwarded() -> None:
    forwarded = clean({
        "messages": [{"role": "system", "content": [{"type": "text", "text": "Be "},
                                                    {"type": "text", "text": "brief"}]},
                     {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"},
                                                                {"type": "image_url", "image_url": {"url": PNG_URL}}]}],
        "max_completion_tokens": 5, "temperature": 0.5, "top_p": 1, "top_k": 40.0, "stop": "END", "seed": 7,
        "stream": True, "stream_options": {"include_usage": True}, "user": "someone", "n": None,
        "response_format": {"type": "text"}, "chat_template_kwargs": {"enable_thinking": False},
    })
    assert forwarded == {
        "model": "colors", "max_tokens": 5, "temperature": 0.5, "top_p": 1.0, "top_k": 40, "stop": ["END"],
        "seed": 7, "stream": True, "chat_template_kwargs": {"enable_thinking": False},
        "messages": [{"role": "system", "content": "Be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                  {"type": "image_url", "image_url": {"url": PNG_URL}}]}],
    }


def test_tool_calling_requests_are_forwarded() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "weather", "description": "d", "parameters": schema}}
    forwarded = clean({
        "messages": [{"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "c1", "type": "function",
                                      "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "weather"}},
    })
    assert forwarded["tools"] == [tool] and forwarded["tool_choice"]["function"] == {"name": "weather"}
    assert forwarded["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert forwarded["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert "tools" not in clean({"messages": MESSAGES, "tools": [], "tool_choice": "auto"})  # some clients send []


@pytest.mark.parametrize(("payload", "param"), [
    ({"messages": MESSAGES, "foo": 1}, "foo"),
    ({"messages": MESSAGES, "logit_bias": {"1": 2}}, "logit_bias"),
    ({"messages": MESSAGES, "images": ["/etc/passwd"]}, "images"),
    ({"messages": MESSAGES, "audios": ["http://10.0.0.5/a.wav"]}, "audios"),
    ({"messages": MESSAGES, "videos": []}, "videos"),
    ({"messages": MESSAGES, "objects": {}}, "objects"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "images": ["/etc/passwd"]}]}, "messages[0].images"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/srv/models/x.bin"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,%%"}}]}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "path": "/etc/passwd"}]}]},
     "messages[0].content[0].path"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "temperature": float("inf")}, "temperature"),
    ({"messages": MESSAGES, "temperature": 11}, "temperature"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10**30}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": True}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"messages": MESSAGES, "n": 1000}, "n"),
    ({"messages": MESSAGES, "seed": -1}, "seed"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": MESSAGES, "stop": ["x"] * 100}, "stop"),
    ({"messages": MESSAGES, "stop": [""]}, "stop[0]"),
    ({"messages": MESSAGES, "model": 5}, "model"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format.type"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"max_pixels": 10**12}}, "chat_template_kwargs.max_pixels"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": json.loads("[" * 40 + "]" * 40)}}]}, "tools[0].function.parameters"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.name"),
])
def test_anything_else_is_refused_naming_the_field(payload: dict[str, Any], param: str) -> None:
    assert refused(payload).param == param


def test_images_have_a_size_cap_and_can_be_switched_off() -> None:
    content = [{"type": "image_url", "image_url": {"url": PNG_URL}}]
    assert clean({"messages": [{"role": "user", "content": content}]}, max_image_bytes=len(PNG))
    big = "data:image/png;base64," + base64.b64encode(PNG + b"\0" * 2048).decode()
    error = refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]},
                    max_image_bytes=1024)
    assert error.code == "image_too_large" and "1 KiB" in error.message
    error = refused({"messages": [{"role": "user", "content": content}]}, max_image_bytes=0)
    assert error.code == "images_not_accepted" and "FINETUNE_GATEWAY_MAX_IMAGE_KB" in error.message


def test_a_refusal_is_a_400_in_the_openai_shape_and_nothing_reaches_the_model(
    served: Deployment, alice: User, upstream: Upstream
) -> None:
    raw = token(alice)
    url = "http://127.0.0.1:9/x"
    ssrf = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}]}
    status, _, content = post(served, raw, ssrf)
    assert status == 400
    error = error_of(content)
    assert error["param"] == "messages[0].content[0].image_url.url" and error["type"] == "invalid_request_error"
    assert "data:image" in error["message"]
    status, _, content = post(served, raw, {"messages": MESSAGES, "foo": 1})
    assert status == 400 and error_of(content)["param"] == "foo" and "'foo'" in error_of(content)["message"]
    for body in ('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                 '{"messages": [{"role": "user", "content": "x"}], "top_p": 1e999}',
                 "[" * 100_000 + "]" * 100_000):
        status, _, content = post(served, raw, body)
        assert status == 400, content
    assert upstream.requests == []


def test_an_accepted_request_reaches_the_model_rebuilt(served: Deployment, alice: User, upstream: Upstream) -> None:
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}}]
    status, _, answer = post(served, token(alice), {
        "messages": [{"role": "user", "content": content, "name": "ann"}], "user": "u-1", "max_completion_tokens": 5,
        "stream_options": {"include_usage": True}, "response_format": {"type": "text"}, "frequency_penalty": None,
    })
    assert status == 200, answer
    (sent,) = upstream.requests
    assert sent == {"model": "colors", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}
    assert json.loads(answer)["choices"][0]["message"]["content"] == "a dog"
    row = Deployment.objects.get(pk=served.pk)
    assert (row.request_count, row.prompt_tokens, row.completion_tokens) == (1, 7, 2)


# --- 2. swift reads no media ----------------------------------------------------------------------------
def test_every_deploy_gets_an_empty_media_folder_and_no_url_host(alice: User, tmp_path: Path) -> None:
    run = Run.objects.create(kind="deploy", subject_id=1, owner=alice)
    env = build_env(run, workdir=tmp_path).env
    folder = Path(env["SWIFT_MEDIA_ALLOWED_DIRS"])
    assert folder == tmp_path / "no-media" and folder.is_dir() and not any(folder.iterdir())
    assert env["SWIFT_URL_ALLOWED_HOSTS"].endswith(".invalid") and "SWIFT_ALLOW_INTERNAL_URL" not in env
    assert build_env(run, workdir=tmp_path).env["SWIFT_MEDIA_ALLOWED_DIRS"] == str(folder)  # a restart: same folder
    folder.chmod(0o755)
    (folder / "secret.png").write_bytes(PNG)
    with pytest.raises(LaunchError, match="empty"):
        build_env(run, workdir=tmp_path)


# --- 3. size caps -----------------------------------------------------------------------------------------
def test_a_body_over_the_cap_is_a_413(served: Deployment, alice: User, upstream: Upstream, settings: Any) -> None:
    settings.FINETUNE_GATEWAY_MAX_BODY_KB = 1
    status, _, content = post(served, token(alice), {"messages": [{"role": "user", "content": "x" * 2000}]})
    assert status == 413 and error_of(content)["code"] == "request_too_large"
    assert "1 KiB" in error_of(content)["message"]
    status, _, _ = post(served, token(alice), {"messages": [{"role": "user", "content": "x" * 500}]})
    assert status == 200
    assert len(upstream.requests) == 1


def test_a_body_longer_than_announced_is_still_capped(served: Deployment, settings: Any) -> None:
    settings.FINETUNE_GATEWAY_MAX_BODY_KB = 1

    class Request:
        headers: dict[str, str] = {}

        def read(self, size: int) -> bytes:
            return b"x" * size

    answer = gateway.parse_chat_body(Request(), served)  # type: ignore[arg-type]
    assert answer.status_code == 413  # type: ignore[union-attr]


@pytest.mark.parametrize("content_length", [True, False])
def test_an_answer_over_the_cap_is_a_502_and_is_not_buffered_whole(
    served: Deployment, alice: User, upstream: Upstream, settings: Any, content_length: bool
) -> None:
    settings.FINETUNE_GATEWAY_MAX_ANSWER_MB = 1
    upstream.mode, upstream.answer_bytes, upstream.content_length = "big", 3 * 2**20, content_length
    status, _, content = post(served, token(alice), {"messages": MESSAGES})
    assert status == 502
    error = error_of(content)
    assert error["code"] == "answer_too_large" and "FINETUNE_GATEWAY_MAX_ANSWER_MB" in error["message"]
    upstream.answer_bytes = 2**19
    status, _, content = post(served, token(alice), {"messages": MESSAGES})
    assert status == 200 and len(content) > 2**19


def test_a_stream_over_the_cap_is_cut_between_events_with_an_error(
    served: Deployment, alice: User, upstream: Upstream, settings: Any
) -> None:
    settings.FINETUNE_GATEWAY_MAX_ANSWER_MB = 1
    upstream.mode, upstream.events, upstream.event_bytes = "stream", 400, 10_000
    status, headers, content = post(served, token(alice), {"messages": MESSAGES, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert 2**20 - 20_000 < len(content) < 2**20 + 1000
    *relayed, last = events(content)
    assert all(len(json.loads(e)["choices"][0]["delta"]["content"]) == 10_000 for e in relayed)  # whole events only
    assert json.loads(last)["error"]["code"] == "answer_too_large"
    wait_for(lambda: upstream.disconnects == 1, timeout=10)  # the model server stopped sending
    row = Deployment.objects.get(pk=served.pk)
    assert row.request_count == 1 and row.completion_tokens == len(relayed)


# --- 4. requests in flight ----------------------------------------------------------------------------------
def test_a_user_over_the_concurrency_limit_gets_429_and_others_do_not(
    served: Deployment, alice: User, bob: User, upstream: Upstream, settings: Any
) -> None:
    settings.FINETUNE_GATEWAY_USER_CONCURRENCY = 1
    upstream.mode, upstream.events, upstream.delay = "stream", 10, 0.05
    raw = token(alice)
    bobs_server = Upstream()
    bobs = serve(bob, bobs_server, name="bobs")

    async def go() -> None:
        client = Caller(raw)
        body = json.dumps({"messages": MESSAGES, "stream": True})
        first = await client.post(chat_path(served), data=body, content_type="application/json")
        assert first.status_code == 200 and relay.slots.held(alice.pk) == 1
        second = await client.post(chat_path(served), data=body, content_type="application/json")
        assert second.status_code == 429 and second.headers["Retry-After"].isdigit()
        error = json.loads(second.content)["error"]
        assert error["type"] == "rate_limit_error" and "FINETUNE_GATEWAY_USER_CONCURRENCY" in error["message"]
        models = await client.get(f"/api/deployments/{served.pk}/v1/models")
        assert models.status_code == 429  # every gateway call counts
        other = await AsyncClient().post(chat_path(bobs), data=json.dumps({"messages": MESSAGES}),
                                         content_type="application/json",
                                         headers={"Authorization": f"Bearer {await sync_to_async(token)(bob)}"})
        assert other.status_code == 200, other.content  # bob's own limit
        assert b"[DONE]" in b"".join([chunk async for chunk in first.streaming_content])
        assert relay.slots.held(alice.pk) == 0
        again = await client.post(chat_path(served), data=json.dumps({"messages": MESSAGES}),
                                  content_type="application/json")
        assert again.status_code == 200

    try:
        async_to_sync(go)()
    finally:
        bobs_server.close()


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """Weak references to every streamed answer's relay the gateway makes."""
    made: list[weakref.ref[Any]] = []
    original = relay.Relay.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(relay.Relay, "__init__", init)
    return made


def open_stream(deployment: Deployment, raw: str) -> Any:
    return AsyncClient().post(chat_path(deployment), data=json.dumps({"messages": MESSAGES, "stream": True}),
                              content_type="application/json", headers={"Authorization": f"Bearer {raw}"})


def test_a_stream_dropped_before_its_first_byte_frees_its_slot_and_connection(
    served: Deployment, alice: User, upstream: Upstream, relays: list[weakref.ref[Any]]
) -> None:
    """The client left before Django started sending: the response is dropped unread (M10's
    suspected leak: nothing had started the relay, so nothing closed the upstream answer)."""
    upstream.mode, upstream.events, upstream.delay = "stream", 200, 0.02
    raw = token(alice)

    async def go() -> None:
        response = await open_stream(served, raw)
        assert response.status_code == 200 and relay.slots.held(alice.pk) == 1
        answer = relays[-1]().upstream
        del response
        await asyncio.sleep(0.01)  # the loop lets go of the view's result
        gc.collect()
        assert relay.slots.held(alice.pk) == 0  # as soon as the response is gone
        for _ in range(100):
            await asyncio.sleep(0.05)
            if answer.is_closed:
                break
        assert answer.is_closed

    async_to_sync(go)()
    wait_for(lambda: upstream.disconnects == 1, timeout=10)
    assert Deployment.objects.get(pk=served.pk).request_count == 1


def test_a_stream_never_started_is_closed_after_the_start_deadline(
    served: Deployment, alice: User, upstream: Upstream, relays: list[weakref.ref[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "START_DEADLINE_SECONDS", 0.2)
    upstream.mode, upstream.events, upstream.delay = "stream", 200, 0.02
    raw = token(alice)

    async def go() -> None:
        response = await open_stream(served, raw)  # held: only the deadline can close it
        stream = relays[-1]()
        await asyncio.sleep(0.6)
        assert stream.closed and stream.upstream.is_closed and relay.slots.held(alice.pk) == 0
        assert response.status_code == 200

    async_to_sync(go)()
    wait_for(lambda: upstream.disconnects == 1, timeout=10)


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_connection(
    served: Deployment, alice: User, upstream: Upstream, relays: list[weakref.ref[Any]]
) -> None:
    upstream.mode, upstream.events, upstream.pause = "stream", 50, 1.0
    raw = token(alice)

    async def go() -> None:
        response = await open_stream(served, raw)
        chunks = response.streaming_content.__aiter__()
        assert (await chunks.__anext__()).startswith(b"data: ")
        waiting = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(0.1)
        waiting.cancel()  # what Django does when the client disconnects while the relay waits
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream = relays[-1]()
        assert stream.closed and stream.upstream.is_closed and relay.slots.held(alice.pk) == 0

    async_to_sync(go)()
    wait_for(lambda: upstream.disconnects == 1, timeout=10)
    assert Deployment.objects.get(pk=served.pk).request_count == 1


@pytest.fixture
def live_one_each(transactional_db: None, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """``live_server_url`` of a daphne server that allows one gateway request per user."""
    monkeypatch.setenv("FINETUNE_GATEWAY_USER_CONCURRENCY", "1")
    return request.getfixturevalue("live_server_url")


def test_under_daphne_a_client_that_disconnects_mid_stream_frees_its_slot_and_the_model_server(
    live_one_each: str, alice: User, upstream: Upstream
) -> None:
    deployment = serve(alice, upstream)
    upstream.mode, upstream.events, upstream.delay = "stream", 100, 0.05
    url = f"{live_one_each}{chat_path(deployment)}"
    headers = {"Authorization": f"Bearer {token(alice)}"}
    body = {"messages": MESSAGES, "stream": True}
    with httpx.Client(trust_env=False, timeout=30) as client:
        with client.stream("POST", url, headers=headers, json=body) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()  # kept: a dropped iterator closes the connection at once
            assert next(chunks).startswith(b"data: ")
            busy = httpx.post(url, headers=headers, json=body, trust_env=False, timeout=30)
            assert busy.status_code == 429 and busy.headers["Retry-After"]
        # The connection is closed: daphne cancels the view's relay, which frees everything.
        wait_for(lambda: upstream.disconnects == 1, timeout=10)
        again = client.post(url, headers=headers, json={"messages": MESSAGES})
        assert again.status_code == 200, again.text


def test_waiting_for_a_connection_is_short_and_a_full_pool_is_a_503(
    served: Deployment, alice: User, upstream: Upstream, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.FINETUNE_GATEWAY_POOL_TIMEOUT_SECONDS = 0.3
    gateway._clients.clear()

    async def pool_timeout() -> None:
        assert gateway._client().timeout.pool == 0.3

    async_to_sync(pool_timeout)()
    upstream.mode, upstream.events, upstream.delay = "stream", 40, 0.05
    made = gateway._client

    def one_connection() -> httpx.AsyncClient:
        client = made()
        client._transport._pool._max_connections = 1  # the pool of a very busy gateway
        return client

    monkeypatch.setattr(gateway, "_client", one_connection)
    raw = token(alice)

    async def go() -> None:
        client = Caller(raw)
        body = json.dumps({"messages": MESSAGES, "stream": True})
        first = await client.post(chat_path(served), data=body, content_type="application/json")
        started = time.monotonic()
        second = await client.post(chat_path(served), data=body, content_type="application/json")
        assert second.status_code == 503 and time.monotonic() - started < 5
        assert json.loads(second.content)["error"]["code"] == "gateway_busy" and "Retry-After" in second.headers
        assert b"[DONE]" in b"".join([chunk async for chunk in first.streaming_content])

    async_to_sync(go)()


# --- 5. the host's address ------------------------------------------------------------------------------------
def test_a_worker_records_its_hosts_address(db: None, settings: Any) -> None:
    settings.FINETUNE_HOST_ADDRESS = "10.1.2.3"
    me = WorkerIdentity()
    host_claim(name="gpu-host-01", me=me)
    assert Host.objects.get(name="gpu-host-01").address == "10.1.2.3"
    settings.FINETUNE_HOST_ADDRESS = "10.1.2.4"  # changed, worker restarted: its agent records the new one
    host_announce(name="gpu-host-01", discovery=Discovery("none", []), cpu_slots=1, instance=me.instance)
    assert Host.objects.get(name="gpu-host-01").address == "10.1.2.4"


def test_swift_binds_to_the_hosts_address(alice: User, local_model: Path, settings: Any) -> None:
    announce_host(cpu=1)
    settings.FINETUNE_HOST_ADDRESS = "10.1.2.3"
    deployment = services.deployment_create(owner=alice, name="c", model="fake-model", gpu_config={"cpu": True})
    argv = build_argv(deployment, port=8123, api_key="k", gpu_count=0)
    assert argv[argv.index("--host") + 1] == "10.1.2.3"


def test_the_gateway_calls_the_address_of_the_deployments_host(alice: User, settings: Any) -> None:
    """Two servers on one port: the deployment's host's (127.0.0.2) and a decoy on 127.0.0.1."""
    remote = Upstream(address="127.0.0.2")
    decoy = Upstream(address="127.0.0.1", port=remote.port, names=("someone-elses",))
    try:
        deployment = serve(alice, remote, host="gpu-host-01", address="127.0.0.2")
        raw = token(alice)
        status, _, content = post(deployment, raw, {"messages": MESSAGES})
        assert status == 200 and len(remote.requests) == 1 and decoy.requests == []

        async def names() -> tuple[int, bytes]:
            response = await AsyncClient().get(f"/api/deployments/{deployment.pk}/v1/models",
                                               headers={"Authorization": f"Bearer {raw}"})
            return response.status_code, response.content

        status, content = async_to_sync(names)()
        assert status == 200 and [m["id"] for m in json.loads(content)["data"]] == ["colors"]
        # The host forgot its address (an old worker): 127.0.0.1 would be another host's server.
        Host.objects.filter(name="gpu-host-01").update(address="")
        status, _, content = post(deployment, raw, {"messages": MESSAGES})
        assert status == 503 and error_of(content)["code"] == "host_address_unknown"
        assert "gpu-host-01" in error_of(content)["message"] and decoy.requests == []
    finally:
        remote.close()
        decoy.close()


def test_this_hosts_deployment_without_an_address_is_reached_on_loopback(
    alice: User, upstream: Upstream
) -> None:
    deployment = serve(alice, upstream, address="")
    status, _, _ = post(deployment, token(alice), {"messages": MESSAGES})
    assert status == 200 and len(upstream.requests) == 1


def test_an_answer_from_another_deployments_server_is_a_502(alice: User) -> None:
    other = Upstream(names=("someone-elses",))
    try:
        deployment = serve(alice, other)
        raw = token(alice)

        async def names() -> tuple[int, bytes]:
            response = await AsyncClient().get(f"/api/deployments/{deployment.pk}/v1/models",
                                               headers={"Authorization": f"Bearer {raw}"})
            return response.status_code, response.content

        status, content = async_to_sync(names)()
        assert status == 502 and error_of(content)["code"] == "wrong_upstream"
        assert b"someone-elses" not in content
        other.mode = "key_error"  # another deployment's server refuses this deployment's key
        status, _, content = post(deployment, raw, {"messages": MESSAGES})
        assert status == 502 and "different server" in error_of(content)["message"]
        assert Deployment.objects.get(pk=deployment.pk).request_count == 0
    finally:
        other.close()


def test_a_deployment_on_another_address_runs_end_to_end(
    runners: Runners, alice: User, local_model: Path, settings: Any
) -> None:
    """The fake swift deploy bound to 127.0.0.2 (FINETUNE_HOST_ADDRESS): the readiness probe and
    the gateway both find it there."""
    settings.FINETUNE_HOST_ADDRESS = "127.0.0.2"
    announce_host(cpu=1)
    assert Host.objects.get(name=settings.FINETUNE_HOST).address == "127.0.0.2"
    deployment = services.deployment_create(owner=alice, name="colors", model="fake-model", gpu_config={"cpu": True})
    row = wait_status(runners.dispatch_and_start(deployment), DeploymentStatus.RUNNING)
    assert row.command[row.command.index("--host") + 1] == "127.0.0.2"
    status, _, content = post(row, token(alice), {"messages": MESSAGES, "max_tokens": 3})
    assert status == 200 and json.loads(content)["choices"][0]["message"]["content"] == "This is a"


# --- 6. streams end when their token does ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["revoke", "deactivate"])
def test_a_stream_stops_within_seconds_when_its_token_is_revoked(
    served: Deployment, alice: User, upstream: Upstream, settings: Any, how: str
) -> None:
    settings.FINETUNE_SOCKET_RECHECK_SECONDS = 0.3
    upstream.mode, upstream.events, upstream.pause, upstream.delay = "stream", 50, 30.0, 0.05  # silent after one
    raw = token(alice)

    def take_away() -> None:
        if how == "revoke":
            api_token_revoke(token=ApiToken.objects.get(user=alice, name="gateway"))
        else:
            User.objects.filter(pk=alice.pk).update(is_active=False)

    async def go() -> list[bytes]:
        response = await AsyncClient().post(chat_path(served), data=json.dumps({"messages": MESSAGES, "stream": True}),
                                            content_type="application/json", headers={"Authorization": f"Bearer {raw}"})
        chunks = response.streaming_content.__aiter__()
        received = [await chunks.__anext__()]
        await sync_to_async(take_away)()
        started = time.monotonic()
        received += [chunk async for chunk in chunks]
        assert time.monotonic() - started < 3
        return received

    received = async_to_sync(go)()
    *_, last = events(b"".join(received))
    assert json.loads(last)["error"]["code"] == "invalid_api_key"
    assert upstream.finished_streams == 0


def test_a_stream_whose_token_stays_valid_is_not_cut(
    served: Deployment, alice: User, upstream: Upstream, settings: Any
) -> None:
    settings.FINETUNE_SOCKET_RECHECK_SECONDS = 0.1
    upstream.mode, upstream.events, upstream.delay = "stream", 10, 0.05
    status, _, content = post(served, token(alice), {"messages": MESSAGES, "stream": True})
    assert status == 200 and events(content)[-1] == "[DONE]" and len(events(content)) == 11


# --- 7. the playground ----------------------------------------------------------------------------------------
def test_the_playground_is_held_to_the_same_rules(
    served: Deployment, alice: User, upstream: Upstream, settings: Any
) -> None:
    path = f"/deployments/{served.pk}/chat/"
    ssrf = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.5/"}}]}]}

    async def go() -> None:
        client = AsyncClient()
        await client.aforce_login(alice)
        response = await client.post(path, data=json.dumps(ssrf), content_type="application/json")
        assert response.status_code == 400
        assert json.loads(response.content)["error"]["param"] == "messages[0].content[0].image_url.url"
        response = await client.post(path, data=json.dumps({"messages": MESSAGES, "images": ["/etc/passwd"]}),
                                     content_type="application/json")
        assert response.status_code == 400 and json.loads(response.content)["error"]["param"] == "images"
        settings.FINETUNE_GATEWAY_MAX_BODY_KB = 1
        response = await client.post(path, data=json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}),
                                     content_type="application/json")
        assert response.status_code == 413
        settings.FINETUNE_GATEWAY_MAX_BODY_KB = 8192
        settings.FINETUNE_GATEWAY_USER_CONCURRENCY = 1
        settings.FINETUNE_SOCKET_RECHECK_SECONDS = 0.3
        upstream.mode, upstream.events, upstream.pause = "stream", 5, 30.0
        first = await client.post(path, data=json.dumps({"messages": MESSAGES, "stream": True}),
                                  content_type="application/json")
        assert first.status_code == 200
        second = await client.post(path, data=json.dumps({"messages": MESSAGES}), content_type="application/json")
        assert second.status_code == 429
        chunks = first.streaming_content.__aiter__()
        await chunks.__anext__()
        await client.alogout()  # the session ends: so does its stream
        rest = b"".join([chunk async for chunk in chunks])
        assert json.loads(events(rest)[-1])["error"]["code"] == "invalid_api_key"

    async_to_sync(go)()
    assert upstream.requests == [{"model": "colors", "messages": MESSAGES, "stream": True}]


# --- the real swift deploy ----------------------------------------------------------------------------------------
@pytest.mark.real_swift
@pytest.mark.timeout(600)
def test_the_real_swift_deploy_reads_no_file_and_fetches_no_url_named_in_a_request(
    transactional_db: None, deploy_ports: tuple[int, int], alice: User, tiny_model: Path, settings: Any
) -> None:
    """Defence in depth: even a request that reached swift without the gateway cannot make it read a
    file of the host or fetch a URL (SWIFT_MEDIA_ALLOWED_DIRS, SWIFT_URL_ALLOWED_HOSTS)."""
    announce_host(cpu=1)
    box = Runners()
    try:
        deployment = services.deployment_create(
            owner=alice, name="base", model=tiny_model.name, gpu_config={"cpu": True},
            deploy_args={"model_type": "qwen2", "template": "qwen2_5", "max_new_tokens": 4})
        row = wait_status(box.dispatch_and_start(deployment), DeploymentStatus.RUNNING, timeout=300)
        url = f"http://127.0.0.1:{row.port}/v1/chat/completions"
        secret = tiny_model / "config.json"

        def direct(item: dict[str, Any]) -> httpx.Response:
            return httpx.post(url, trust_env=False, timeout=120, headers={"Authorization": f"Bearer {row.api_key}"},
                              json={"model": "base", "max_tokens": 2, "messages": [
                                  {"role": "user", "content": [item, {"type": "text", "text": "hi"}]}]})

        as_path = direct({"type": "image_url", "image_url": {"url": str(secret)}})
        assert as_path.status_code >= 400 and "SWIFT_MEDIA_ALLOWED_DIRS" in as_path.text, as_path.text
        as_url = direct({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}})
        assert as_url.status_code >= 400 and "SWIFT_URL_ALLOWED_HOSTS" in as_url.text, as_url.text
        # Through the gateway the same requests never reach swift; a plain one is answered.
        raw = token(alice)
        status, _, content = post(row, raw, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(secret)}}]}]})
        assert status == 400 and error_of(content)["code"] == "image_url_not_allowed"
        status, _, content = post(row, raw, {"messages": MESSAGES, "max_tokens": 2})
        assert status == 200, content
    finally:
        for active in Deployment.objects.filter(pk__in=list(box.threads)):
            services.deployment_stop(deployment=active)
        for thread in box.threads.values():
            thread.join(60)
        kill_leftovers()

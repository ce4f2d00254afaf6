"""The OpenAI-compatible gateway in front of a (fake) ``swift deploy``: the ``openai`` client against
the real ASGI app under daphne, token authentication (401), ownership (404), streaming, usage
counts, and the page's chat playground (session + CSRF)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import User
from django.test import AsyncClient, Client

from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke
from deployments import services
from deployments.models import Deployment, DeploymentStatus
from tests.conftest import announce_host
from tests.deployments.conftest import Runners, wait_status

pytestmark = pytest.mark.timeout(180)
MESSAGES = [{"role": "user", "content": "what color is the dog"}]


@pytest.fixture
def running(runners: Runners, alice: User, local_model: Path) -> Deployment:
    announce_host(cpu=1)
    deployment = services.deployment_create(owner=alice, name="colors", model="fake-model", gpu_config={"cpu": True})
    return wait_status(runners.dispatch_and_start(deployment), DeploymentStatus.RUNNING)


def token(user: User) -> str:
    return api_token_create(user=user, name="gateway")[1]


def call(method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None,
         client: AsyncClient | None = None, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    """One request through the real async views (Django's ASGI test client); a streamed body is
    read chunk by chunk. Returns status, headers, body."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        c = client or AsyncClient()
        kwargs: dict[str, Any] = {"headers": headers or {}, **extra}
        if body is not None:
            kwargs.update(data=body if isinstance(body, (str, bytes)) else json.dumps(body),
                          content_type="application/json")
        response = await getattr(c, method)(path, **kwargs)
        if response.streaming:
            content = b"".join([chunk async for chunk in response.streaming_content])
        else:
            content = response.content
        return response.status_code, dict(response.headers), content

    return async_to_sync(go)()


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def base(deployment: Deployment) -> str:
    return f"/api/deployments/{deployment.pk}/v1"


def test_the_openai_client_chats_and_streams_through_the_platform(
    running: Deployment, alice: User, live_server_url: str
) -> None:
    client = openai.OpenAI(base_url=f"{live_server_url}{base(running)}", api_key=token(alice), max_retries=0)
    assert [m.id for m in client.models.list()] == ["colors"]
    reply = client.chat.completions.create(model="colors", messages=MESSAGES, max_tokens=50)
    assert reply.choices[0].message.content == "This is a fake reply to: what color is the dog"
    assert reply.usage is not None and reply.usage.completion_tokens == 11
    chunks = list(client.chat.completions.create(model="colors", messages=MESSAGES, stream=True))
    assert len(chunks) >= 10
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    row = Deployment.objects.get(pk=running.pk)
    assert row.request_count == 3 and row.completion_tokens == 22
    assert row.prompt_tokens == 2 * reply.usage.prompt_tokens and row.last_request_at is not None
    # A revoked token stops working at once; another user's token sees no such deployment.
    api_token_revoke(token=ApiToken.objects.get(user=alice, name="gateway"))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    bob = User.objects.create_user("bob", "bob@example.com", "bob-pass-123")
    as_bob = openai.OpenAI(base_url=f"{live_server_url}{base(running)}", api_key=token(bob), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        as_bob.chat.completions.create(model="colors", messages=MESSAGES)


def test_a_completion_and_a_stream_are_relayed_and_counted(running: Deployment, alice: User) -> None:
    key = bearer(token(alice))
    status, headers, body = call("post", f"{base(running)}/chat/completions", headers=key,
                                 body={"messages": MESSAGES, "max_tokens": 3})  # "model" filled in
    assert status == 200, body
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["content"] == "This is a"
    assert reply["usage"]["completion_tokens"] == 3
    status, headers, body = call("post", f"{base(running)}/chat/completions", headers=key,
                                 body={"model": "colors", "messages": MESSAGES, "stream": True, "max_tokens": 4})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1])
    assert text == "This is a fake"
    row = Deployment.objects.get(pk=running.pk)
    assert row.request_count == 2 and row.completion_tokens == 3 + 4
    assert row.prompt_tokens == 2 * reply["usage"]["prompt_tokens"]


def test_swifts_own_errors_are_passed_on(running: Deployment, alice: User) -> None:
    status, _, body = call("post", f"{base(running)}/chat/completions", headers=bearer(token(alice)),
                           body={"model": "other", "messages": MESSAGES})
    assert status == 400 and "is not in the model_list" in body.decode()


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ftp_not-a-real-token", "Basic YWxpY2U6eA==",
                                    "REVOKED", "SESSION-ONLY"])
def test_no_token_a_bad_or_revoked_token_is_401(running: Deployment, alice: User, header: str | None) -> None:
    headers: dict[str, str] = {}
    client = None
    if header == "REVOKED":
        row, raw = api_token_create(user=alice, name="old")
        api_token_revoke(token=row)
        headers = bearer(raw)
    elif header == "SESSION-ONLY":  # the gateway never looks at a browser's session cookie
        client = AsyncClient()
        client.force_login(alice)
    elif header is not None:
        headers = {"Authorization": header}
    for method, path, body in [("get", "models", None), ("post", "chat/completions", {"messages": MESSAGES})]:
        status, response_headers, content = call(method, f"{base(running)}/{path}", headers=headers, body=body,
                                                 client=client)
        assert status == 401, (header, path, content)
        assert json.loads(content)["error"]["code"] == "invalid_api_key"
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert Deployment.objects.get(pk=running.pk).request_count == 0


def test_bob_cannot_call_or_chat_with_alices_deployment(running: Deployment, bob: User) -> None:
    key = bearer(token(bob))
    for method, path, body in [("get", "models", None), ("post", "chat/completions", {"messages": MESSAGES})]:
        status, _, content = call(method, f"{base(running)}/{path}", headers=key, body=body)
        assert status == 404 and json.loads(content)["error"]["code"] == "deployment_not_found"
    status, _, _ = call("get", f"/api/deployments/{running.pk}/", headers={"Authorization": key["Authorization"]})
    assert status == 404
    assert Deployment.objects.get(pk=running.pk).request_count == 0


def test_a_deployment_that_is_not_running_answers_503(running: Deployment, alice: User) -> None:
    services.deployment_stop(deployment=running)
    wait_status(running, DeploymentStatus.STOPPED)
    status, _, content = call("post", f"{base(running)}/chat/completions", headers=bearer(token(alice)),
                              body={"messages": MESSAGES})
    assert status == 503 and json.loads(content)["error"]["code"] == "deployment_not_running"


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", json.dumps({"messages": []})])
def test_a_malformed_request_is_400(running: Deployment, alice: User, body: str) -> None:
    status, _, content = call("post", f"{base(running)}/chat/completions", headers=bearer(token(alice)), body=body)
    assert status == 400 and "error" in json.loads(content)


def test_the_internal_key_never_reaches_the_user(running: Deployment, alice: User) -> None:
    status, _, content = call("get", f"/api/deployments/{running.pk}/", headers=bearer(token(alice)))
    assert status == 200 and running.api_key not in content.decode()
    status, _, content = call("get", f"/api/deployments/{running.pk}/logs/?limit=5000", headers=bearer(token(alice)))
    assert status == 200 and running.api_key not in content.decode()
    page = Client()
    page.force_login(alice)
    assert running.api_key not in page.get(f"/deployments/{running.pk}/").content.decode()


def test_the_playground_streams_for_the_logged_in_owner_only(running: Deployment, alice: User, bob: User) -> None:
    path = f"/deployments/{running.pk}/chat/"
    body = {"messages": MESSAGES, "stream": True}
    owner = AsyncClient(enforce_csrf_checks=True)
    owner.force_login(alice)
    status, _, _ = call("post", path, body=body, client=owner)
    assert status == 403  # no CSRF token: a cross-site page cannot make the browser chat
    page = Client()
    page.force_login(alice)
    page.get(f"/deployments/{running.pk}/")
    csrf = page.cookies[settings.CSRF_COOKIE_NAME].value
    owner.cookies[settings.CSRF_COOKIE_NAME] = csrf
    status, headers, content = call("post", path, body=body, client=owner, headers={"X-CSRFToken": csrf})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert content.decode().rstrip().endswith("data: [DONE]")
    other = AsyncClient()
    other.force_login(bob)
    assert call("post", path, body=body, client=other)[0] == 404
    assert call("post", path, body=body)[0] == 401

"""Fixtures of the web portal tests: tasks stored directly (no queue), session cookies, sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from tasks.models import FinetuningTask, TaskStatus

ORIGIN = (b"origin", b"http://testserver")


def session_cookie(user: User) -> str:
    """A logged-in session of ``user``, as the browser's cookie value."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def ws_headers(user: User | None, origin: tuple[bytes, bytes] = ORIGIN) -> list[tuple[bytes, bytes]]:
    headers = [origin]
    if user is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_cookie(user)}".encode()))
    return headers


@pytest.fixture
def make_task() -> Callable[..., FinetuningTask]:
    """Store a task row directly (nothing is dispatched): the pages and sockets only read it."""

    def make(owner: User, **fields: Any) -> FinetuningTask:
        values: dict[str, Any] = {
            "name": "colors",
            "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
            "model_path": "Qwen/Qwen2.5-0.5B-Instruct",
            "datasets": ["AI-ModelScope/alpaca-gpt4-data-en#50"],
            "status": TaskStatus.RUNNING,
            "gpu_config": {"cpu": True},
        }
        values.update(fields)
        return FinetuningTask.objects.create(owner=owner, **values)

    return make

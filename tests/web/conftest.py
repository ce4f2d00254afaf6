"""Fixtures of the web portal tests: tasks stored directly (no queue), session cookies, sockets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tasks import services
from tasks.models import Dataset, FinetuningTask, TaskStatus

ORIGIN = (b"origin", b"http://testserver")


def login(user: User) -> Client:
    """A page client with ``user`` logged in."""
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alice_client(alice: User) -> Client:
    return login(alice)


@pytest.fixture
def bob_client(bob: User) -> Client:
    return login(bob)


@pytest.fixture
def staff_client(staff: User) -> Client:
    return login(staff)


@pytest.fixture
def dataset(alice: User, data_files: dict[str, Path]) -> Dataset:
    """Alice's uploaded dataset "colors" (64 rows in the messages format)."""
    content = data_files["sft_messages"].read_bytes()
    return services.dataset_create(owner=alice, upload=SimpleUploadedFile("colors.jsonl", content), name="colors")


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

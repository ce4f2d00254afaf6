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

from gpus.models import Lane, Run, RunKind, RunStatus
from tasks import services
from tasks.models import Dataset, FinetuningTask, TaskStatus

ORIGIN = (b"origin", b"http://testserver")

#: The state of a task's current run for each task status (pages and sockets read both).
RUN_STATUS = {TaskStatus.PENDING: RunStatus.PENDING, TaskStatus.QUEUED: RunStatus.QUEUED,
              TaskStatus.RUNNING: RunStatus.RUNNING, TaskStatus.COMPLETED: RunStatus.SUCCEEDED,
              TaskStatus.FAILED: RunStatus.FAILED, TaskStatus.STOPPED: RunStatus.STOPPED}
#: Runtime columns a test may give ``make_task``: they live on the task's run (the old names read
#: through), ``error_message`` as the run's ``error``.
RUN_FIELDS = {"pid", "process_started", "runner_pid", "heartbeat_at", "exit_code", "error_message", "command",
              "queued_at", "started_at", "finished_at", "stop_requested_at", "host", "master_port",
              "runner_instance"}


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
        """``fields``: the task's columns, and runtime columns (``RUN_FIELDS``) of its current run."""
        run_fields = {("error" if name == "error_message" else name): fields.pop(name)
                      for name in RUN_FIELDS & set(fields)}
        values: dict[str, Any] = {
            "name": "colors",
            "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
            "model_path": "Qwen/Qwen2.5-0.5B-Instruct",
            "datasets": ["AI-ModelScope/alpaca-gpt4-data-en#50"],
            "status": TaskStatus.RUNNING,
            "gpu_config": {"cpu": True},
        }
        values.update(fields)
        task = FinetuningTask.objects.create(owner=owner, **values)
        task.run = Run.objects.create(
            kind=RunKind.TRAIN, subject_id=task.pk, owner=owner, label=f"#{task.pk} {task.name}", lane=Lane.TRAIN,
            number=task.run_number, status=RUN_STATUS.get(task.status, RunStatus.PENDING), priority=task.priority,
            held=task.held, gpu_config=task.gpu_config, memory_estimate_gb=task.memory_estimate_gb,
            log_file_path=task.log_file_path, **run_fields,
        )
        task.save(update_fields=["run"])
        return task

    return make

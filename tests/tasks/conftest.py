"""Fixtures shared by the task tests: an uploaded dataset and a task factory (fake swift runs)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile

from gpus.scheduler import dispatch
from tasks import services
from tasks.models import Dataset, FinetuningTask

#: Six quick steps with a checkpoint every three (the fake swift honours them).
ARGS = {"max_steps": 6, "logging_steps": 1, "save_steps": 3, "model_type": "qwen2", "template": "qwen2_5"}


@pytest.fixture
def dataset(alice: User, data_files: dict[str, Path]) -> Dataset:
    content = data_files["sft_messages"].read_bytes()
    return services.dataset_create(owner=alice, upload=SimpleUploadedFile("colors.jsonl", content))


@pytest.fixture
def make_task(alice: User, local_model: Path, dataset: Dataset) -> Callable[..., FinetuningTask]:
    def make(**overrides: Any) -> FinetuningTask:
        """Create through the service (CPU slot by default) and dispatch it."""
        fields: dict[str, Any] = {"owner": alice, "name": "colors", "base_model": str(local_model),
                                  "datasets": [dataset.pk], "training_args": ARGS, "gpu_config": {"cpu": True}}
        fields.update(overrides)
        task = services.finetuning_task_create(**fields)
        dispatch()
        task.refresh_from_db()
        return task

    return make


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Live processes in sessions of their own, standing in for a runner (a worker process) or a swift
    group; killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

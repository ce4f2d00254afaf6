"""A newcomer's first run, for real: the ``cpu-smoke`` preset with no configuration at all trains the
built-in tiny model, which the worker builds on first use, with the real ``swift`` CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks.models import FinetuningTask, TaskMetric
from tests.conftest import wait_for
from tests.tasks.test_real_swift import wait_terminal

pytestmark = [pytest.mark.real_swift, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]


def test_the_smoke_preset_runs_end_to_end_with_no_configuration(
    worker: Callable[..., Any], alice_api: APIClient, settings: Any, tmp_path: Path
) -> None:
    builtin_dir = tmp_path / "builtin-models"  # this test's own: the model is built by this run
    settings.FINETUNE_SMOKE_MODEL = ""
    settings.BUILTIN_MODELS_DIR = builtin_dir
    worker(FINETUNE_SMOKE_MODEL="", FINETUNE_BUILTIN_MODELS_DIR=str(builtin_dir))
    response = alice_api.post("/api/finetuning/tasks/", {"preset": "cpu-smoke", "auto_export": True}, format="json")
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["base_model"] == "builtin:tiny-qwen2" and created["gpu_config"] == {}

    data = wait_terminal(alice_api, created["id"], timeout=300)
    task = FinetuningTask.objects.get(pk=created["id"])
    assert data["status"] == "completed", (task.error_message, Path(task.log_file_path).read_text()[-3000:])
    model = builtin_dir / "tiny-qwen2"
    assert (model / "model.safetensors").is_file()
    assert task.command[task.command.index("--model") + 1] == str(model)
    assert task.current_step == 20 and task.progress == 100.0
    assert TaskMetric.objects.filter(task=task, kind="train", loss__isnull=False).count() == 20
    # Export (and deploy) load the base model from the path swift stored with the checkpoint.
    checkpoint = Path(task.last_checkpoint)
    assert json.loads((checkpoint / "args.json").read_text())["model"] == str(model)

    def exported() -> dict[str, Any] | None:
        found = alice_api.get(f"/api/finetuning/tasks/{task.pk}/exports/").json()
        return found[0] if found and found[0]["status"] in ("completed", "failed") else None

    export = wait_for(exported, timeout=120, interval=0.5)
    assert export["status"] == "completed", (export["error_message"], export["log"][-3000:])
    assert (Path(export["output_path"]) / "model.safetensors").is_file()

"""The real thing: API → django-q2 queue → a real worker process → the real ``swift`` CLI on CPU.

The suite builds a tiny random Qwen2 model and tiny datasets itself (tests/fixtures); nothing is
downloaded. These tests take about a minute on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from gpus.process import group_members
from tasks.models import FinetuningTask
from tests.conftest import upload, wait_for

pytestmark = [pytest.mark.real_swift, pytest.mark.django_db(transaction=True), pytest.mark.timeout(900)]

REAL_ARGS = {
    "model_type": "qwen2", "template": "qwen2_5", "max_steps": 6, "logging_steps": 1, "save_steps": 3,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 128,
    "dataloader_num_workers": 0,
}
TERMINAL = {"completed", "failed", "stopped"}


def create(client: APIClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/finetuning/tasks/", {"gpu_config": {"cpu": True}, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def wait_terminal(client: APIClient, task_id: int, timeout: float = 400) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        data = client.get(f"/api/finetuning/tasks/{task_id}/").json()
        return data if data["status"] in TERMINAL else None

    return wait_for(done, timeout=timeout, interval=0.5)


def all_log_lines(client: APIClient, task_id: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/api/finetuning/tasks/{task_id}/logs/?after={after}&limit=500").json()
        if not page["lines"]:
            return lines
        lines += page["lines"]
        after = page["next"]


def test_sft_pt_and_dpo_train_for_real_through_the_queue(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path]
) -> None:
    worker(FINETUNE_CPU_SLOTS="2")
    sft = upload(alice_api, data_files["sft_messages"])
    pt = upload(alice_api, data_files["pt_text"])
    dpo = upload(alice_api, data_files["dpo"])
    assert (sft["format"], pt["format"], dpo["format"]) == ("messages", "text", "preference")
    started = time.monotonic()
    tasks = {
        "sft": create(alice_api, name="real sft", task_type="sft", base_model=str(tiny_model),
                      datasets=[sft["id"]], training_args=REAL_ARGS),
        "pt": create(alice_api, name="real pt", task_type="pt", base_model="tiny-qwen2",  # relative to the root
                     datasets=[pt["id"]], training_args=REAL_ARGS),
        "dpo": create(alice_api, name="real dpo", task_type="dpo", base_model=str(tiny_model),
                      datasets=[dpo["id"]], training_args=REAL_ARGS),
    }
    for kind, created in tasks.items():
        task = wait_terminal(alice_api, created["id"])
        assert task["status"] == "completed", (kind, task["error_message"], all_log_lines(alice_api, task["id"])[-15:])
        assert task["progress"] == 100 and task["current_step"] == 6 and task["max_steps"] == 6
        assert task["exit_code"] == 0 and task["command"][1] in ("sft", "pt", "rlhf")
        assert "--output_dir" in task["command"] and task["command_line"].startswith(task["command"][0])
        metrics = alice_api.get(f"/api/finetuning/tasks/{task['id']}/metrics/").json()
        train = [p for p in metrics["results"] if p["kind"] == "train"]
        assert [p["step"] for p in train] == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(p["loss"], float) for p in train), train
        assert metrics["summary"]["train_runtime"] > 0
        lines = all_log_lines(alice_api, task["id"])
        assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
        assert any("[INFO:swift]" in line["text"] for line in lines)
        checkpoint = Path(task["last_checkpoint"])
        assert checkpoint.name == "checkpoint-6" and (checkpoint / "adapter_model.safetensors").is_file()
        timeline = alice_api.get(f"/api/finetuning/tasks/{task['id']}/events/").json()["results"]
        events = [e["kind"] for e in timeline]
        assert events[:3] == ["created", "queued", "started"] and events[-1] == "completed"
        assert timeline[1]["message"].startswith("Reserved a CPU slot on ")  # booked by the scheduler
        assert "checkpoint" in events
    dpo_points = alice_api.get(f"/api/finetuning/tasks/{tasks['dpo']['id']}/metrics/").json()["results"]
    assert "rewards/margins" in dpo_points[0]["values"]
    from gpus.models import Reservation

    assert not Reservation.objects.exists()  # every slot was given back
    print(f"\nreal sft+pt+dpo through the queue: {time.monotonic() - started:.1f} s wall")


def test_stopping_a_real_run_leaves_no_process_of_its_group(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path]
) -> None:
    worker()
    sft = upload(alice_api, data_files["sft_messages"])
    created = create(alice_api, name="long", base_model=str(tiny_model), datasets=[sft["id"]],
                     training_args={**REAL_ARGS, "max_steps": 5000, "save_steps": 2, "dataloader_num_workers": 1})
    row = wait_for(lambda: FinetuningTask.objects.filter(pk=created["id"], current_step__gte=3).first(), timeout=180)
    assert len(group_members(row.pid)) >= 2  # the swift wrapper, its trainer and a dataloader worker
    response = alice_api.post(f"/api/finetuning/tasks/{created['id']}/stop/")
    assert response.status_code == 200
    task = wait_terminal(alice_api, created["id"], timeout=60)
    assert task["status"] == "stopped"
    assert group_members(row.pid) == []
    assert Path(task["last_checkpoint"]).name.startswith("checkpoint-")


def test_real_failures_end_failed_with_a_readable_reason(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path]
) -> None:
    worker(FINETUNE_CPU_SLOTS="2")
    sft = upload(alice_api, data_files["sft_messages"])
    hub_dataset = create(alice_api, name="hub data offline", base_model=str(tiny_model),
                         datasets=["AI-ModelScope/alpaca-gpt4-data-zh#20"], training_args=REAL_ARGS)
    hub_model = create(alice_api, name="hub model offline", base_model="Qwen/Qwen2.5-0.5B-Instruct",
                       datasets=[sft["id"]], training_args={**REAL_ARGS, "model_type": "qwen2"})
    missing = upload(alice_api, data_files["sft_alpaca"])
    from tasks.models import Dataset

    Path(Dataset.objects.get(pk=missing["id"]).path).unlink()
    missing_file = create(alice_api, name="missing file", base_model=str(tiny_model), datasets=[missing["id"]],
                          training_args=REAL_ARGS)

    task = wait_terminal(alice_api, hub_dataset["id"])
    assert task["status"] == "failed"
    assert task["error_message"].startswith("Could not download AI-ModelScope/alpaca-gpt4-data-zh from the model hub")
    assert "offline" in task["error_message"]
    task = wait_terminal(alice_api, hub_model["id"])
    assert task["status"] == "failed"
    assert task["error_message"].startswith("Could not download"), task["error_message"]
    task = wait_terminal(alice_api, missing_file["id"])
    assert task["status"] == "failed" and "is missing" in task["error_message"]

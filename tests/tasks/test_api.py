"""The /api/finetuning/ API: creation, validation errors that name the field, ownership."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django_q.models import OrmQ
from rest_framework.test import APIClient

from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host, upload

# Tasks start only where a live host offers a slot (here: one CPU slot).
pytestmark = pytest.mark.usefixtures("cpu_host")


def task_body(model: Path, dataset_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "colors",
        "base_model": str(model),
        "datasets": [dataset_id],
        "training_args": {"max_steps": 4, "logging_steps": 1, "model_type": "qwen2", "template": "qwen2_5"},
        "gpu_config": {"cpu": True},
        **extra,
    }


@pytest.fixture
def dataset(alice_api: APIClient, data_files: dict[str, Path]) -> dict[str, Any]:
    return upload(alice_api, data_files["sft_messages"])


@pytest.fixture
def task(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> dict[str, Any]:
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_creating_a_task_returns_201_with_id_and_status_and_queues_it(task: dict[str, Any]) -> None:
    assert task["id"] > 0
    assert task["status"] == "pending"
    row = FinetuningTask.objects.get(pk=task["id"])
    # One free slot: dispatch moved it to queued and enqueued exactly one worker job.
    assert row.status == TaskStatus.QUEUED
    assert OrmQ.objects.count() == 1
    assert row.output_path.endswith(f"/tasks/{row.pk}/output")
    assert row.model_source == "local"


def test_the_output_folder_is_chosen_by_the_server_and_the_name_is_only_a_label(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any]
) -> None:
    body = task_body(local_model, dataset["id"], output_name="/etc/evil/../../x")
    response = alice_api.post("/api/finetuning/tasks/", body, format="json")
    assert response.status_code == 201
    data = response.json()
    assert data["output_name"] == "/etc/evil/../../x"
    assert "/workspaces/" in data["output_path"] and "/etc/" not in data["output_path"]


def test_a_hub_model_and_hub_datasets_pass_through(alice_api: APIClient) -> None:
    body = {"name": "hub", "base_model": "Qwen/Qwen2.5-7B-Instruct",
            "datasets": ["AI-ModelScope/alpaca-gpt4-data-zh#500", "swift/self-cognition#500"]}
    response = alice_api.post("/api/finetuning/tasks/", body, format="json")
    assert response.status_code == 201, response.content
    row = FinetuningTask.objects.get(pk=response.json()["id"])
    assert row.model_source == "hub" and row.model_path == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"base_model": ""}, "base_model"),
        ({"base_model": "/etc"}, "base_model"),
        ({"base_model": "../../etc"}, "base_model"),
        ({"base_model": "./models"}, "base_model"),
        ({"base_model": "builtin:../x"}, "base_model"),
        ({"base_model": "builtin:nope"}, "base_model"),
        ({"datasets": []}, "datasets"),
        ({"datasets": ["/etc/passwd"]}, "datasets"),
        ({"datasets": ["../../secret.jsonl"]}, "datasets"),
        ({"datasets": [999999]}, "datasets"),
        ({"task_type": "ppo"}, "task_type"),
        ({"train_type": "magic"}, "train_type"),
        ({"priority": 11}, "priority"),
        ({"gpu_config": {"devices": "0; rm -rf /"}}, "gpu_config"),
        ({"gpu_config": {"devices": "0,0"}}, "gpu_config"),  # one card twice: it could never start
        ({"gpu_config": {"gpu_ids": [1, 2, 1]}}, "gpu_config"),
        ({"gpu_config": {"devices": ",".join(str(i) for i in range(65))}}, "gpu_config"),
        ({"training_args": "--output_dir /tmp/x"}, "training_args"),
        # swift opens a system prompt ending in .txt as a file (its text would land in the log)
        ({"training_args": {"system": "/etc/hostname.txt"}}, "training_args"),
        ({"training_args": {"system": "../../secret.txt"}}, "training_args"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    body = {**task_body(local_model, dataset["id"]), **change}
    response = alice_api.post("/api/finetuning/tasks/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert FinetuningTask.objects.count() == 0


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"no_such_arg": 1}, "no_such_arg"),
        ({"learning_rate": 5}, "learning_rate"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"max_steps": "ten"}, "max_steps"),
        ({"system": "--output_dir x"}, "system"),
        ({"system": "-x"}, "system"),
        ({"--output_dir": "x"}, "--output_dir"),
        ({"output_dir": "/tmp/x"}, "output_dir"),
        ({"target_modules": ["q_proj", "--external_plugins"]}, "target_modules"),
        ({"model_type": "qwen2 --custom_register_path x"}, "model_type"),
    ],
)
def test_bad_training_args_are_a_400_naming_the_key(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any], args: dict[str, Any], key: str
) -> None:
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], training_args=args),
                              format="json")
    assert response.status_code == 400, response.content
    assert key in response.json()["training_args"]


def test_a_symlink_escaping_the_model_root_is_refused(
    alice_api: APIClient, model_root: Path, tmp_path: Path, dataset: dict[str, Any]
) -> None:
    outside = tmp_path / "outside-model"
    outside.mkdir()
    link = model_root / "sneaky"
    link.symlink_to(outside)
    try:
        response = alice_api.post("/api/finetuning/tasks/", task_body(Path("sneaky"), dataset["id"]), format="json")
        assert response.status_code == 400
        assert "outside" in response.json()["base_model"][0]
    finally:
        link.unlink()


def test_a_preference_task_needs_preference_rows(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any]
) -> None:
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], task_type="dpo"),
                              format="json")
    assert response.status_code == 400
    assert "rejected_response" in response.json()["datasets"][0]


def test_unauthenticated_requests_are_401(client: Any, db: None) -> None:
    assert APIClient().get("/api/finetuning/tasks/").status_code == 401
    assert APIClient().post("/finetuning/createTask", {}, format="json").status_code == 401


def test_list_is_paginated_and_filters_by_status_type_and_name(alice_api: APIClient, task: dict[str, Any]) -> None:
    body = alice_api.get("/api/finetuning/tasks/").json()
    assert set(body) >= {"count", "next", "previous", "results"} and body["count"] == 1
    assert alice_api.get("/api/finetuning/tasks/?status=queued").json()["count"] == 1
    assert alice_api.get("/api/finetuning/tasks/?status=running").json()["count"] == 0
    assert alice_api.get("/api/finetuning/tasks/?task_type=dpo").json()["count"] == 0
    assert alice_api.get("/api/finetuning/tasks/?search=colo").json()["count"] == 1
    assert alice_api.get("/api/finetuning/tasks/?search=zzz").json()["count"] == 0
    bad = alice_api.get("/api/finetuning/tasks/?status=bogus")
    assert bad.status_code == 400 and "status" in bad.json()


def test_stopping_a_queued_task_is_immediate_and_idempotent(alice_api: APIClient, task: dict[str, Any]) -> None:
    first = alice_api.post(f"/api/finetuning/tasks/{task['id']}/stop/")
    assert first.status_code == 200 and first.json()["status"] == "stopped"
    again = alice_api.post(f"/api/finetuning/tasks/{task['id']}/stop/")
    assert again.status_code == 200 and again.json()["status"] == "stopped"
    kinds = [e["kind"] for e in alice_api.get(f"/api/finetuning/tasks/{task['id']}/events/").json()["results"]]
    assert kinds == ["created", "queued", "stopped"]


def test_deleting_a_task_removes_its_records_and_is_idempotent(alice_api: APIClient, task: dict[str, Any]) -> None:
    assert alice_api.delete(f"/api/finetuning/tasks/{task['id']}/").status_code == 204
    assert not FinetuningTask.objects.filter(pk=task["id"]).exists()
    assert alice_api.delete(f"/api/finetuning/tasks/{task['id']}/").status_code == 404


def test_logs_validate_their_parameters(alice_api: APIClient, task: dict[str, Any]) -> None:
    response = alice_api.get(f"/api/finetuning/tasks/{task['id']}/logs/?after=-1")
    assert response.status_code == 400 and "after" in response.json()
    response = alice_api.get(f"/api/finetuning/tasks/{task['id']}/logs/?limit=abc")
    assert response.status_code == 400 and "limit" in response.json()
    assert alice_api.get(f"/api/finetuning/tasks/{task['id']}/logs/").json() == {"lines": [], "next": 0, "more": False}


def test_the_owner_downloads_the_whole_log_file(alice_api: APIClient, task: dict[str, Any]) -> None:
    from tasks.models import FinetuningTask

    path = Path(FinetuningTask.objects.get(pk=task["id"]).log_file_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(300_000)))  # ~3 MB, several chunks
    response = alice_api.get(f"/api/finetuning/tasks/{task['id']}/logs/download/")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    assert f'filename="task-{task["id"]}.log"' in response["Content-Disposition"]
    assert b"".join(response.streaming_content) == path.read_bytes()


def test_under_asgi_a_download_is_streamed_asynchronously(tmp_path: Path) -> None:
    """Django would read a synchronous body to its end, into memory, before sending it under daphne."""
    import asyncio

    from django.test import AsyncRequestFactory

    from core.streaming import file_chunks, streamed_download

    path = tmp_path / "big.log"
    path.write_bytes(b"x" * (3 * (1 << 20) + 5))
    response = streamed_download(AsyncRequestFactory().get("/"), file_chunks(path), content_type="text/plain",
                                 filename="big.log")
    assert response.is_async

    async def collect() -> list[bytes]:
        return [chunk async for chunk in response.streaming_content]

    chunks = asyncio.run(collect())
    assert len(chunks) == 4 and b"".join(chunks) == path.read_bytes()


# --- ownership --------------------------------------------------------------------------------
def test_bob_gets_404_on_every_route_of_alices_task(bob_api: APIClient, task: dict[str, Any]) -> None:
    base = f"/api/finetuning/tasks/{task['id']}/"
    assert bob_api.get(base).status_code == 404
    assert bob_api.post(base + "stop/").status_code == 404
    assert bob_api.get(base + "logs/").status_code == 404
    assert bob_api.get(base + "logs/download/").status_code == 404
    assert bob_api.get(base + "metrics/").status_code == 404
    assert bob_api.get(base + "events/").status_code == 404
    assert bob_api.delete(base).status_code == 404
    assert bob_api.get("/api/finetuning/tasks/").json()["count"] == 0
    row = FinetuningTask.objects.get(pk=task["id"])
    assert row.stop_requested_at is None and row.delete_requested_at is None


def test_bob_gets_404_on_alices_dataset_and_cannot_train_on_it(
    bob_api: APIClient, dataset: dict[str, Any], local_model: Path
) -> None:
    assert bob_api.get(f"/api/finetuning/datasets/{dataset['id']}/").status_code == 404
    assert bob_api.delete(f"/api/finetuning/datasets/{dataset['id']}/").status_code == 404
    assert bob_api.get("/api/finetuning/datasets/").json()["count"] == 0
    response = bob_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert response.status_code == 400 and "datasets" in response.json()


def test_bob_gets_404_on_the_seed_calls_for_alices_task(bob_api: APIClient, task: dict[str, Any]) -> None:
    tid = task["id"]
    assert bob_api.get(f"/finetuning/getTask?id={tid}").status_code == 404
    assert bob_api.get(f"/finetuning/getTaskLog?id={tid}").status_code == 404
    assert bob_api.post("/finetuning/stopTask", {"id": tid}, format="json").status_code == 404
    assert bob_api.delete(f"/finetuning/deleteTask?id={tid}").status_code == 404
    assert bob_api.get("/finetuning/getTaskList").json()["data"]["total"] == 0
    assert FinetuningTask.objects.filter(pk=tid, run__stop_requested_at__isnull=True).exists()


def test_staff_see_every_users_tasks(staff_api: APIClient, task: dict[str, Any]) -> None:
    assert staff_api.get(f"/api/finetuning/tasks/{task['id']}/").status_code == 200
    assert staff_api.get("/api/finetuning/tasks/").json()["count"] == 1


# --- datasets ---------------------------------------------------------------------------------
def test_an_upload_records_format_and_rows(dataset: dict[str, Any]) -> None:
    assert dataset["format"] == "messages" and dataset["rows"] == 64 and dataset["file_type"] == "jsonl"


def test_a_broken_jsonl_upload_is_a_400_with_the_line_number(alice_api: APIClient) -> None:
    content = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    upload_file = io.BytesIO(content)
    upload_file.name = "broken.jsonl"
    response = alice_api.post("/api/finetuning/datasets/", {"file": upload_file}, format="multipart")
    assert response.status_code == 400
    assert "line 2" in response.json()["file"][0]


def test_an_upload_without_a_file_names_the_field(alice_api: APIClient) -> None:
    response = alice_api.post("/api/finetuning/datasets/", {"name": "x"}, format="multipart")
    assert response.status_code == 400 and "file" in response.json()


def test_an_unsupported_file_type_is_refused(alice_api: APIClient) -> None:
    upload_file = io.BytesIO(b"hello")
    upload_file.name = "notes.txt"
    response = alice_api.post("/api/finetuning/datasets/", {"file": upload_file}, format="multipart")
    assert response.status_code == 400 and ".txt" in response.json()["file"][0]


# --- presets and seed calls -------------------------------------------------------------------
def test_presets_include_the_seeds_fixed_qwen_preset_exactly(alice_api: APIClient) -> None:
    presets = {p["name"]: p for p in alice_api.get("/api/finetuning/presets/").json()["results"]}
    seed = presets["qwen2.5-7b-lora"]
    assert seed["base_model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert seed["datasets"] == ["AI-ModelScope/alpaca-gpt4-data-zh#500", "AI-ModelScope/alpaca-gpt4-data-en#500",
                                "swift/self-cognition#500"]
    assert seed["training_args"] == {
        "torch_dtype": "bfloat16", "num_train_epochs": 1, "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32,
        "target_modules": ["all-linear"], "gradient_accumulation_steps": 16, "eval_steps": 50, "save_steps": 50,
        "save_total_limit": 2, "logging_steps": 5, "max_length": 2048, "system": "You are a helpful assistant.",
        "warmup_ratio": 0.05, "dataloader_num_workers": 4, "model_author": "swift", "model_name": "swift-robot",
    }
    assert "cpu-smoke" in presets


def test_an_unknown_builtin_model_is_a_400_that_names_the_known_ones(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any]
) -> None:
    body = task_body(local_model, dataset["id"], base_model="builtin:../x")
    response = alice_api.post("/api/finetuning/tasks/", body, format="json")
    assert response.status_code == 400
    assert response.json()["base_model"] == [
        "'builtin:../x' is not a built-in model (built-in models: builtin:tiny-qwen2)"
    ]


def test_the_builtin_tiny_model_is_accepted_as_a_base_model(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any], settings: Any
) -> None:
    response = alice_api.post("/api/finetuning/tasks/",
                              task_body(local_model, dataset["id"], base_model="builtin:tiny-qwen2"), format="json")
    assert response.status_code == 201, response.content
    row = FinetuningTask.objects.get(pk=response.json()["id"])
    assert row.base_model == "builtin:tiny-qwen2" and row.model_source == "local"
    assert row.model_path == str(settings.BUILTIN_MODELS_DIR / "tiny-qwen2")


def test_the_smoke_preset_needs_no_configuration_and_runs_automatically(
    alice_api: APIClient, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.FINETUNE_SMOKE_MODEL = ""
    presets = {p["name"]: p for p in alice_api.get("/api/finetuning/presets/").json()["results"]}
    smoke = presets["cpu-smoke"]
    assert smoke["available"] is True and smoke["unavailable_reason"] == ""
    assert smoke["base_model"] == "builtin:tiny-qwen2" and smoke["gpu_config"] == {}
    assert smoke["title"].startswith("Smoke test") and "learns nothing useful" in smoke["description"]
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.post("/api/finetuning/tasks/", {"preset": "cpu-smoke"}, format="json")
    assert response.status_code == 201, response.content
    row = FinetuningTask.objects.get(pk=response.json()["id"])
    assert row.gpu_config == {} and row.training_args["model_type"] == "qwen2"
    assert row.status == TaskStatus.QUEUED  # automatic: the CPU host's slot


def test_creating_from_the_seed_preset_needs_only_its_name(alice_api: APIClient) -> None:
    announce_host("gpu-host-01", "1x80")
    response = alice_api.post("/api/finetuning/tasks/", {"preset": "qwen2.5-7b-lora", "output_name": "llm_test",
                                                         "gpu_config": {"gpu_id": "0"}}, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["base_model"] == "Qwen/Qwen2.5-7B-Instruct" and data["gpu_config"] == {"devices": "0"}
    assert data["training_args"]["gradient_accumulation_steps"] == 16


def test_an_unknown_preset_is_a_400(alice_api: APIClient) -> None:
    response = alice_api.post("/api/finetuning/tasks/", {"preset": "nope"}, format="json")
    assert response.status_code == 400 and "preset" in response.json()


def test_the_seed_create_call_takes_the_camelcase_body(
    alice_api: APIClient, local_model: Path, dataset: dict[str, Any]
) -> None:
    announce_host("gpu-host-01", "2x80")
    body = {
        "name": "my_finetuning_task", "description": "ChatGLM3 医疗问答微调", "baseModel": str(local_model),
        "datasetPath": dataset["name"], "outputPath": "/output/medical_chatglm3",
        "trainingArgs": {"num_train_epochs": 5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                         "learning_rate": 2e-4, "max_seq_length": 512},
        "gpuConfig": {"cuda_visible_devices": "0,1"},
    }
    response = alice_api.post("/finetuning/createTask", body, format="json")
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert response.json()["code"] == 0
    assert data["datasetPath"] == [dataset["id"]] and data["gpuConfig"] == {"devices": "0,1"}
    assert data["trainingArgs"]["max_length"] == 512 and data["outputName"] == "/output/medical_chatglm3"
    tid = data["id"]
    assert alice_api.get(f"/finetuning/getTask?id={tid}").json()["data"]["name"] == "my_finetuning_task"
    listing = alice_api.get("/finetuning/getTaskList?page=1&pageSize=10").json()["data"]
    assert listing["total"] == 1 and listing["list"][0]["id"] == tid
    assert alice_api.get(f"/finetuning/getTaskLog?id={tid}").json()["data"]["lines"] == []
    assert alice_api.post("/finetuning/stopTask", {"id": tid}, format="json").json()["data"]["status"] == "stopped"
    assert alice_api.delete(f"/finetuning/deleteTask?id={tid}").status_code == 200
    assert alice_api.get(f"/finetuning/getTask?id={tid}").status_code == 404


def test_the_seed_create_call_names_missing_and_bad_fields_in_its_own_spelling(alice_api: APIClient) -> None:
    response = alice_api.post("/finetuning/createTask", {"name": "x"}, format="json")
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"baseModel", "datasetPath"}
    response = alice_api.post("/finetuning/createTask", {"name": "x", "baseModel": "Qwen/Qwen2.5-7B-Instruct",
                                                         "datasetPath": "a/b", "trainingArgs": {"bogus": 1}},
                              format="json")
    assert response.status_code == 400 and "bogus" in response.json()["errors"]["trainingArgs"]
    assert alice_api.get("/finetuning/getTask?id=abc").status_code == 400

"""The real chain on CPU: tiny model → real ``swift sft`` through the queue → real ``swift export``
(merge LoRA) → real ``swift deploy`` of the adapters, of the merged model and of a local model,
started by the platform's worker → the ``openai`` client (and plain HTTP) through the platform's
gateway under daphne gets a completion and a streamed completion; then stop, and the port is free
and no process of the group is left."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from accounts.services import api_token_create
from deployments.models import Deployment, DeploymentStatus
from deployments.ports import listening_pid
from gpus.models import Reservation
from gpus.process import group_members
from tests.conftest import upload, wait_for
from tests.deployments.conftest import nothing_listens
from tests.tasks.test_real_swift import REAL_ARGS, create, wait_terminal

pytestmark = [pytest.mark.real_swift, pytest.mark.django_db(transaction=True), pytest.mark.timeout(900)]
MESSAGES = [{"role": "user", "content": "What color is the dog number six?"}]


def wait_running(client: APIClient, pk: int, timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        data = client.get(f"/api/deployments/{pk}/").json()
        assert data["status"] not in ("failed", "stopped"), data
        return data if data["status"] == "running" else None

    return wait_for(ready, timeout=timeout, interval=0.25)


def test_a_trained_checkpoint_and_a_local_model_are_served_through_the_gateway(
    worker: Callable[..., Any], stop_all_deployments: None, alice: User, alice_api: APIClient, tiny_model: Path,
    data_files: dict[str, Path], live_server_url: str, deploy_ports: tuple[int, int],
) -> None:
    worker(FINETUNE_CPU_SLOTS="3", FINETUNE_DEPLOY_PORTS=f"{deploy_ports[0]}-{deploy_ports[1]}")
    dataset = upload(alice_api, data_files["sft_messages"])
    task = create(alice_api, name="colors", base_model=str(tiny_model), datasets=[dataset["id"]],
                  training_args={**REAL_ARGS, "max_steps": 4, "save_steps": 4})
    task = wait_terminal(alice_api, task["id"])
    assert task["status"] == "completed", task["error_message"]
    # Merge the adapters into a full model (a queued export job on the worker).
    response = alice_api.post(f"/api/finetuning/tasks/{task['id']}/export/", {}, format="json")
    assert response.status_code == 201, response.content
    export_id = response.json()["id"]

    def exported() -> dict[str, Any] | None:
        (found,) = [e for e in alice_api.get(f"/api/finetuning/tasks/{task['id']}/exports/").json()
                    if e["id"] == export_id]
        return found if found["status"] in ("completed", "failed") else None

    export = wait_for(exported, timeout=300, interval=0.5)
    assert export["status"] == "completed", (export["error_message"], export["log"][-2000:])

    started = time.monotonic()
    response = alice_api.post("/api/deployments/", {"name": "colors", "task": task["id"],
                                                    "gpu_config": {"cpu": True}}, format="json")
    assert response.status_code == 201, response.content
    adapters = response.json()
    response = alice_api.post("/api/deployments/", {
        "name": "base", "model": "tiny-qwen2", "gpu_config": {"cpu": True},
        "deploy_args": {"model_type": "qwen2", "template": "qwen2_5", "max_new_tokens": 16},
    }, format="json")
    assert response.status_code == 201, response.content
    local = response.json()

    adapters = wait_running(alice_api, adapters["id"])
    key = api_token_create(user=alice, name="openai")[1]
    client = openai.OpenAI(base_url=adapters["endpoint"].replace("http://testserver", live_server_url),
                           api_key=key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="colors", messages=MESSAGES, max_tokens=8, temperature=0)
    first_answer = time.monotonic() - started
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    assert [m.id for m in client.models.list()] == ["colors"]
    chunks = list(client.chat.completions.create(model="colors", messages=MESSAGES, max_tokens=6, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    print(f"\nreal deploy → first answer through the gateway: {first_answer:.1f} s; streamed {streamed!r}")

    row = Deployment.objects.get(pk=adapters["id"])
    assert row.command[2] == "--adapters" and Path(row.command[3]).name == "checkpoint-4"
    assert row.request_count == 3 and row.completion_tokens >= 2
    # The swift process itself: loopback only, and it refuses a call without its key.
    assert listening_pid(row.port, row.pid) is not None
    direct = httpx.post(f"http://127.0.0.1:{row.port}/v1/chat/completions", trust_env=False, timeout=60,
                        json={"model": "colors", "messages": MESSAGES, "max_tokens": 2})
    assert direct.status_code == 400 and "API key" in direct.text
    with_user_token = httpx.post(f"http://127.0.0.1:{row.port}/v1/chat/completions", trust_env=False, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "colors", "messages": MESSAGES, "max_tokens": 2})
    assert with_user_token.status_code == 400

    local = wait_running(alice_api, local["id"])
    plain = httpx.post(f"{live_server_url}/api/deployments/{local['id']}/v1/chat/completions", timeout=120,
                       headers={"Authorization": f"Bearer {key}"}, trust_env=False,
                       json={"model": "base", "messages": MESSAGES, "max_tokens": 4})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["role"] == "assistant"
    local_row = Deployment.objects.get(pk=local["id"])
    assert local_row.command[2] == "--model" and local_row.port != row.port

    # The merged export, served as a full model.
    response = alice_api.post("/api/deployments/", {"name": "merged", "task": task["id"], "merged": True,
                                                    "gpu_config": {"cpu": True}}, format="json")
    assert response.status_code == 201, response.content
    merged = wait_running(alice_api, response.json()["id"])
    answer = httpx.post(f"{live_server_url}/api/deployments/{merged['id']}/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"}, trust_env=False,
                        json={"model": "merged", "messages": MESSAGES, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    merged_row = Deployment.objects.get(pk=merged["id"])
    assert merged_row.command[2] == "--model" and merged_row.command[3] == export["output_path"]

    for pk in (adapters["id"], local["id"], merged["id"]):
        response = alice_api.post(f"/api/deployments/{pk}/stop/")
        assert response.status_code == 200
    for before in (row, local_row, merged_row):
        ended = wait_for(lambda b=before: Deployment.objects.filter(pk=b.pk, status=DeploymentStatus.STOPPED).first(),
                         timeout=60)
        assert nothing_listens(ended.port)
        assert group_members(ended.pid) == []
        assert not Reservation.objects.filter(run=ended.run_id).exists()

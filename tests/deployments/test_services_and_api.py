"""Creating deployments (every refusal names its field), the argv and environment swift gets,
ownership on every API route, stopping before start, idle stops. No process is started here."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from core.errors import ServiceValidationError
from core.swift_cli.training_args import TrainingArgsError
from deployments import services
from deployments.command import build_argv, build_env, validate_deploy_args
from deployments.models import Deployment, DeploymentLogLine, DeploymentSource, DeploymentStatus
from gpus.models import Reservation, Run, RunStatus
from gpus.scheduler import dispatch
from tasks.models import FinetuningTask, TaskStatus
from tasks.paths import task_dir
from tests.conftest import announce_host

URL = "/api/deployments/"


def make_task(
    owner: User, *, checkpoints: tuple[int, ...] = (6,), merged: bool = False, **fields: Any
) -> FinetuningTask:
    """A finished LoRA task with checkpoint folders in its (server-chosen) output folder."""
    task = FinetuningTask.objects.create(
        owner=owner, name=fields.pop("name", "colors"), base_model="tiny-qwen2", model_source="local",
        model_path="/nonexistent/tiny-qwen2", datasets=[1], status=TaskStatus.COMPLETED,
        training_args={"model_type": "qwen2", "template": "qwen2_5"}, **fields,
    )
    output = task_dir(owner.pk, task.pk) / "output"
    last = ""
    for step in checkpoints:
        ckpt = output / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_config.json").write_text("{}")
        (ckpt / "args.json").write_text(json.dumps({"model": "/models/tiny-qwen2"}))
        last = str(ckpt)
        if merged:
            (output / f"checkpoint-{step}-merged").mkdir()
            (output / f"checkpoint-{step}-merged" / "config.json").write_text("{}")
    task.output_path, task.last_checkpoint = str(output), last
    task.save(update_fields=["output_path", "last_checkpoint"])
    return task


def errors_of(call: Any) -> dict[str, Any]:
    with pytest.raises(ServiceValidationError) as info:
        call()
    return info.value.errors


@pytest.fixture
def host(db: None) -> Any:
    return announce_host(spec="2x80", cpu=1)


# --- creating -----------------------------------------------------------------------------------------
def test_a_tasks_last_checkpoint_is_deployed_as_adapters_and_dispatched(
    alice: User, host: Any, django_capture_on_commit_callbacks: Any
) -> None:
    task = make_task(alice, checkpoints=(3, 6))
    with django_capture_on_commit_callbacks(execute=True):
        deployment = services.deployment_create(owner=alice, name="Colors v1", task=task.pk, gpu_config={"cpu": True})
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.PENDING and deployment.owner == alice
    assert deployment.source == DeploymentSource.CHECKPOINT and deployment.task == task
    assert Path(deployment.model_path).name == "checkpoint-6"
    assert deployment.served_model_name == "colors-v1" and deployment.backend == "transformers"
    assert deployment.deploy_args == {"model_type": "qwen2", "template": "qwen2_5"}
    assert deployment.log_file_path.startswith(str(settings.WORKSPACES_DIR / str(alice.pk) / "deployments"))
    # The dispatcher placed it on this host's CPU slot (the job waits for the worker).
    assert deployment.host == settings.FINETUNE_HOST
    assert list(Reservation.objects.filter(run=deployment.run_id).values_list("cpu_slot", flat=True)) == [0]


def test_a_named_checkpoint_and_a_merged_model_can_be_chosen(alice: User, host: Any) -> None:
    task = make_task(alice, checkpoints=(3, 6), merged=True)
    early = services.deployment_create(owner=alice, name="early", task=task.pk, checkpoint="checkpoint-3")
    assert Path(early.model_path).name == "checkpoint-3"
    merged = services.deployment_create(owner=alice, name="merged", task=str(task.pk), merged=True,
                                        served_model_name="colors:merged")
    assert merged.source == DeploymentSource.MERGED and Path(merged.model_path).name == "checkpoint-6-merged"
    assert merged.served_model_name == "colors:merged"


def test_a_local_model_is_deployed(alice: User, host: Any, local_model: Path) -> None:
    deployment = services.deployment_create(owner=alice, name="base", model="fake-model",
                                            deploy_args={"model_type": "qwen2", "template": "qwen2_5"})
    assert deployment.source == DeploymentSource.MODEL and deployment.model_path == str(local_model.resolve())
    assert deployment.task is None and deployment.base_model == "fake-model"


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"task": 999_999}, "task", "does not exist"),
        ({"task": "abc"}, "task", "does not exist"),
        ({}, "task", "name a task"),
        ({"task": "TASK", "model": "fake-model"}, "model", "not both"),
        ({"task": "TASK", "checkpoint": "/etc"}, "checkpoint", "inside the task's output folder"),
        ({"task": "TASK", "checkpoint": "../../../../.."}, "checkpoint", "inside the task's output folder"),
        ({"task": "TASK", "checkpoint": "checkpoint-99"}, "checkpoint", "no checkpoint"),
        ({"task": "TASK", "merged": True}, "merged", "no merged model"),
        ({"model": "/etc"}, "model", "allowed model root"),
        ({"model": "../outside"}, "model", ".."),
        ({"model": "Qwen/Qwen2.5-7B-Instruct"}, "model", "only local model folders"),
        ({"task": "TASK", "backend": "tgi"}, "backend", "must be one of"),
        ({"task": "TASK", "backend": "vllm"}, "backend", "not installed"),
        ({"task": "TASK", "gpu_config": {"count": 0}}, "gpu_config", "count"),
        ({"task": "TASK", "gpu_config": "all"}, "gpu_config", "must be an object"),
        ({"task": "TASK", "gpu_config": {"count": 4}}, "gpu_config", "can never run here"),
        ({"task": "TASK", "served_model_name": "bad name!"}, "served_model_name", "letters"),
        ({"task": "TASK", "deploy_args": {"port": 80}}, "deploy_args", "allocated by the platform"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    alice: User, host: Any, local_model: Path, kwargs: dict[str, Any], field: str, words: str
) -> None:
    task = make_task(alice)
    kwargs = {k: (task.pk if v == "TASK" else v) for k, v in kwargs.items()}
    errors = errors_of(lambda: services.deployment_create(owner=alice, name="x", **kwargs))
    assert field in errors, errors
    assert words in json.dumps(errors[field]), errors
    assert not Deployment.objects.exists()


def test_another_users_task_does_not_exist_for_bob(alice: User, bob: User, host: Any) -> None:
    task = make_task(alice)
    errors = errors_of(lambda: services.deployment_create(owner=bob, name="steal", task=task.pk))
    assert errors == {"task": f"task {task.pk} does not exist"}


def test_a_task_without_a_checkpoint_is_refused(alice: User, host: Any) -> None:
    task = make_task(alice, checkpoints=())
    errors = errors_of(lambda: services.deployment_create(owner=alice, name="x", task=task.pk))
    assert "has no checkpoint yet" in errors["task"]


def test_an_installed_backend_is_offered(alice: User, host: Any, settings: Any) -> None:
    settings.FINETUNE_DEPLOY_BACKENDS = ["vllm"]
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="fast", task=task.pk, backend="vllm",
                                            gpu_config={"count": 2})
    assert deployment.backend == "vllm"
    errors = errors_of(lambda: services.deployment_create(owner=alice, name="cpu", task=task.pk, backend="vllm",
                                                          gpu_config={"cpu": True}))
    assert "needs a GPU" in errors["backend"]


def test_deploy_args_come_from_an_allow_list() -> None:
    assert validate_deploy_args({"max_new_tokens": 64, "temperature": "0.5"}) == {"max_new_tokens": 64,
                                                                                 "temperature": 0.5}
    for bad in ({"api_key": "x"}, {"host": "0.0.0.0"}, {"external_plugins": "evil.py"}, {"--port": 1},
                {"system": "--api_key x"}, {"max_new_tokens": -1},
                {"system": "/work/data/other-user/notes.txt"}):  # swift would open a .txt as a file
        with pytest.raises(TrainingArgsError):
            validate_deploy_args(bad)


# --- what swift gets ----------------------------------------------------------------------------------
def test_the_argv_binds_loopback_with_a_key_and_no_shell(alice: User, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="c", task=task.pk,
                                            deploy_args={"max_new_tokens": 32})
    argv = build_argv(deployment, port=8123, api_key="k" * 20, gpu_count=0)
    assert argv[:2] == [settings.FINETUNE_SWIFT_BIN, "deploy"]
    pairs = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert pairs["--adapters"] == deployment.model_path
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123" and pairs["--api_key"] == "k" * 20
    assert pairs["--served_model_name"] == "c" and pairs["--infer_backend"] == "transformers"
    assert pairs["--verbose"] == "false" and pairs["--max_new_tokens"] == "32"
    assert "--model_type" in argv and "--template" in argv


def test_vllm_on_two_gpus_gets_tensor_parallelism_and_their_uuids(
    alice: User, host: Any, settings: Any, tmp_path: Path
) -> None:
    settings.FINETUNE_DEPLOY_BACKENDS = ["vllm"]
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="big", task=task.pk, backend="vllm",
                                            gpu_config={"count": 2})
    assert dispatch() == [deployment.run_id]
    launch = build_env(deployment.run, workdir=tmp_path)
    uuids = list(Reservation.objects.filter(run=deployment.run_id).order_by("gpu__index")
                 .values_list("gpu__uuid", flat=True))
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids) and len(uuids) == 2
    assert "NPROC_PER_NODE" not in launch.env
    argv = build_argv(deployment, port=8100, api_key="k", gpu_count=2)
    assert argv[argv.index("--vllm_tensor_parallel_size") + 1] == "2"


# --- stopping -----------------------------------------------------------------------------------------
def test_stopping_a_placed_deployment_before_it_starts_frees_its_slot(alice: User, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="c", task=task.pk, gpu_config={"cpu": True})
    dispatch()
    assert Reservation.objects.filter(run=deployment.run_id).count() == 1
    deployment = services.deployment_stop(deployment=deployment)
    assert deployment.status == DeploymentStatus.STOPPED and deployment.stop_requested_at is not None
    assert not Reservation.objects.filter(run=deployment.run_id).exists()
    from tests.runs import run_deployment

    assert "not claimed" in run_deployment(deployment.pk)  # the job that was already enqueued is a no-op


def test_idle_deployments_are_asked_to_stop_only_when_configured(alice: User, host: Any, settings: Any) -> None:
    task = make_task(alice)
    old = timezone.now() - timedelta(minutes=30)
    idle = services.deployment_create(owner=alice, name="idle", task=task.pk)
    busy = services.deployment_create(owner=alice, name="busy", task=task.pk)
    Deployment.objects.filter(pk=idle.pk).update(status=DeploymentStatus.RUNNING, ready_at=old, last_request_at=old)
    Deployment.objects.filter(pk=busy.pk).update(status=DeploymentStatus.RUNNING, ready_at=old,
                                                 last_request_at=timezone.now())
    Run.objects.filter(pk__in=[idle.run_id, busy.run_id]).update(status=RunStatus.RUNNING)  # their servers run
    settings.FINETUNE_DEPLOY_IDLE_MINUTES = 0
    assert services.deployment_stop_idle() == []
    settings.FINETUNE_DEPLOY_IDLE_MINUTES = 10
    assert services.deployment_stop_idle() == [idle.pk]
    idle.refresh_from_db()
    busy.refresh_from_db()
    assert idle.stop_requested_at is not None and "10 minutes without requests" in idle.stop_reason
    assert busy.stop_requested_at is None


# --- the API ------------------------------------------------------------------------------------------
def test_the_api_creates_lists_and_shows_a_deployment(alice: User, alice_api: APIClient, host: Any) -> None:
    task = make_task(alice)
    response = alice_api.post(URL, {"name": "colors", "task": task.pk, "gpu_config": {"cpu": True},
                                    "port": 1, "status": "running", "api_key": "mine"}, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["status"] == "pending" and data["port"] is None and data["owner"] == "alice"
    assert data["endpoint"] == f"http://testserver/api/deployments/{data['id']}/v1"
    assert "api_key" not in data
    listing = alice_api.get(URL).json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == data["id"]
    assert alice_api.get(f"{URL}?status=running").json()["count"] == 0
    assert alice_api.get(f"{URL}{data['id']}/").json()["name"] == "colors"
    options = alice_api.get(f"{URL}options/").json()
    assert options["backends"][0] == "transformers" and any(a["name"] == "max_new_tokens"
                                                            for a in options["deploy_args"])


def test_api_errors_name_the_field(alice: User, alice_api: APIClient, host: Any) -> None:
    task = make_task(alice)
    response = alice_api.post(URL, {"name": "x", "task": task.pk, "checkpoint": "/etc/passwd"}, format="json")
    assert response.status_code == 400 and "checkpoint" in response.json()
    response = alice_api.post(URL, {"name": "x", "task": task.pk, "backend": "nope"}, format="json")
    assert response.status_code == 400 and "backend" in response.json()
    response = alice_api.post(URL, {"task": task.pk}, format="json")
    assert response.status_code == 400 and "name" in response.json()


def test_bob_cannot_see_stop_read_or_delete_alices_deployment(
    alice: User, alice_api: APIClient, bob_api: APIClient, host: Any
) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="mine", task=task.pk)
    DeploymentLogLine.objects.create(deployment=deployment, seq=1, text="secret", created_at=timezone.now())
    assert bob_api.get(URL).json()["count"] == 0
    for method, path in [("get", ""), ("post", "stop/"), ("get", "logs/"), ("delete", "")]:
        response = getattr(bob_api, method)(f"{URL}{deployment.pk}/{path}")
        assert response.status_code == 404, (method, path, response.content)
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.PENDING and deployment.stop_requested_at is None
    # Filtering by task tells nothing about other users' task ids: Alice's and a missing one look alike.
    for task_id in (task.pk, 999_999):
        response = bob_api.get(f"{URL}?task={task_id}")
        assert response.status_code == 200 and response.json()["count"] == 0, response.content
    assert alice_api.get(f"{URL}?task={task.pk}").json()["count"] == 1
    assert alice_api.get(f"{URL}?task=abc").status_code == 400  # not a number: a 400 naming the filter
    assert alice_api.get(f"{URL}{deployment.pk}/logs/").json()["lines"][0]["text"] == "secret"


def test_the_api_stops_and_deletes(alice: User, alice_api: APIClient, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="c", task=task.pk)
    response = alice_api.post(f"{URL}{deployment.pk}/stop/")
    assert response.status_code == 200 and response.json()["status"] == "stopped"
    assert alice_api.post(f"{URL}{deployment.pk}/stop/").status_code == 200  # idempotent
    assert alice_api.delete(f"{URL}{deployment.pk}/").status_code == 204
    assert not Deployment.objects.filter(pk=deployment.pk).exists()


def test_the_logs_resume_after_a_sequence_number(alice: User, alice_api: APIClient, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="c", task=task.pk)
    now = timezone.now()
    DeploymentLogLine.objects.bulk_create(
        [DeploymentLogLine(deployment=deployment, seq=i, text=f"line {i}", created_at=now) for i in range(1, 8)]
    )
    page = alice_api.get(f"{URL}{deployment.pk}/logs/?after=3&limit=2").json()
    assert [line["seq"] for line in page["lines"]] == [4, 5] and page["next"] == 5 and page["status"] == "pending"
    assert alice_api.get(f"{URL}{deployment.pk}/logs/?after=7").json() == {"lines": [], "next": 7,
                                                                          "status": "pending"}

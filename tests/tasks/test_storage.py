"""Storage hygiene (issue 12): the default ``save_total_limit``, measuring a task's folder, the storage
figures per owner, and deleting a task's outputs from the API, the page and the admin (refused while
it runs, while an export is active or a deployment serves it), with the fake ``swift``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from core.errors import ServiceValidationError
from deployments.models import Deployment, DeploymentStatus
from gpus import jobs
from gpus.scheduler import dispatch
from tasks import selectors, services, storage
from tasks.command import build_argv
from tasks.models import Dataset, EventKind, FinetuningTask, TaskLogLine, TaskMetric, TaskStatus
from tasks.outputs import human_bytes
from tasks.paths import folder_size, task_dir
from tests.runs import run_export, run_to_end

pytestmark = pytest.mark.usefixtures("cpu_host")


@pytest.fixture
def completed(fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]) -> FinetuningTask:
    """A task that trained 6 steps and saved checkpoint-3 and checkpoint-6."""
    task = run_to_end(make_task())
    assert task.status == TaskStatus.COMPLETED, task.error_message
    return task


def checkpoint_names(task: FinetuningTask) -> list[str]:
    return sorted(p.name for p in Path(task.output_path).glob("checkpoint-*"))


# --- the default save_total_limit -----------------------------------------------------------------
def _unsaved_task(model: Path, **training_args: Any) -> FinetuningTask:
    return FinetuningTask(owner_id=1, name="t", base_model=str(model), model_source="local", model_path=str(model),
                          datasets=["builtin:smoke_sft"], training_args={"model_type": "qwen2", **training_args})


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_a_task_that_sets_no_save_total_limit_gets_the_platform_default_on_its_command_line(
    tmp_path: Path, settings: Any
) -> None:
    settings.FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT = 3
    argv = build_argv(_unsaved_task(tmp_path), output_dir=tmp_path / "out")
    assert _flag(argv, "--save_total_limit") == "3"
    argv = build_argv(_unsaved_task(tmp_path, save_total_limit=1), output_dir=tmp_path / "out")
    assert _flag(argv, "--save_total_limit") == "1" and argv.count("--save_total_limit") == 1  # the task's own
    settings.FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT = 0  # 0: swift's default, every checkpoint is kept
    assert "--save_total_limit" not in build_argv(_unsaved_task(tmp_path), output_dir=tmp_path / "out")


def test_the_default_limit_keeps_the_last_checkpoints_of_a_run_that_saves_every_step(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice: User
) -> None:
    args = {"max_steps": 6, "logging_steps": 1, "save_steps": 1, "model_type": "qwen2", "template": "qwen2_5"}
    task = run_to_end(make_task(training_args=args))
    assert task.status == TaskStatus.COMPLETED, task.error_message
    assert _flag(task.command, "--save_total_limit") == str(settings.FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT) == "3"
    assert checkpoint_names(task) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    client = Client()
    client.force_login(alice)
    html = client.get(f"/tasks/{task.pk}/").content.decode()
    row = re.search(r'<tr data-default-arg="save_total_limit">.*?</tr>', html, re.S)
    assert row is not None and "<code>3</code>" in row.group(0) and "platform default" in row.group(0)


# --- measuring ------------------------------------------------------------------------------------
def test_the_task_folder_is_measured_when_a_run_ends_and_when_an_export_ends(completed: FinetuningTask) -> None:
    folder = task_dir(completed.owner_id, completed.pk)
    assert completed.output_measured_at is not None
    assert completed.output_bytes == folder_size(folder) > 0
    before = completed.output_bytes

    export = services.task_export_create(task=completed)
    dispatch()
    run_export(export.pk)
    completed.refresh_from_db()
    export.refresh_from_db()
    assert export.status == "completed" and export.size_bytes
    assert completed.output_bytes == folder_size(folder) >= before + export.size_bytes


def test_the_sweep_measures_running_tasks_not_measured_lately(
    make_task: Callable[..., FinetuningTask], fake_swift: Callable[..., None]
) -> None:
    task = make_task()  # queued on this host's CPU slot
    FinetuningTask.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING)
    folder = task_dir(task.owner_id, task.pk) / "output"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x" * 5000)

    jobs.sweep()  # every host's minutely sweep: the training workload measures its running tasks
    task.refresh_from_db()
    assert task.output_bytes == 5000 and task.output_measured_at is not None

    (folder / "more.bin").write_bytes(b"x" * 1000)
    assert storage.task_storage_sweep(host=settings.FINETUNE_HOST) == 0  # measured a moment ago
    FinetuningTask.objects.filter(pk=task.pk).update(output_measured_at=timezone.now() - timedelta(minutes=11))
    assert storage.task_storage_sweep(host="another-host") == 0  # its folder is written on this host
    assert storage.task_storage_sweep(host=settings.FINETUNE_HOST) == 1
    task.refresh_from_db()
    assert task.output_bytes == 6000


def test_storage_by_owner_adds_task_folders_and_datasets_and_largest_outputs_lists_the_biggest(
    alice: User, bob: User, dataset: Dataset, make_task: Callable[..., FinetuningTask]
) -> None:
    small, big = make_task(name="small"), make_task(name="big")
    FinetuningTask.objects.filter(pk=small.pk).update(output_bytes=1_000)
    FinetuningTask.objects.filter(pk=big.pk).update(output_bytes=5 * 10**9)

    assert selectors.storage_by_owner(owner_ids=[alice.pk, bob.pk]) == {
        alice.pk: 1_000 + 5 * 10**9 + dataset.size_bytes, bob.pk: 0}
    assert selectors.storage_by_owner() == {alice.pk: 1_000 + 5 * 10**9 + dataset.size_bytes}

    largest = selectors.largest_outputs(limit=1)
    assert [t.pk for t in largest] == [big.pk] and largest[0].owner.username == "alice"
    assert [t.name for t in selectors.largest_outputs()] == ["big", "small"]


# --- deleting outputs: the API --------------------------------------------------------------------
def test_the_owner_deletes_a_tasks_outputs_through_the_api_and_keeps_its_history(
    completed: FinetuningTask, alice_api: APIClient
) -> None:
    task = completed
    output = Path(task.output_path)
    lines, points = TaskLogLine.objects.filter(task=task).count(), TaskMetric.objects.filter(task=task).count()
    before = task.output_bytes
    assert checkpoint_names(task) == ["checkpoint-3", "checkpoint-6"]

    response = alice_api.delete(f"/api/finetuning/tasks/{task.pk}/outputs/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == task.pk and body["outputs_deleted_at"] and body["last_checkpoint"] == ""
    assert body["checkpoints"] == [] and body["can_resume"] is False
    assert 0 < body["output_bytes"] < before
    assert checkpoint_names(task) == [] and not (output / "last-checkpoint").is_symlink()
    # What stays: the record, its log (file and lines), swift's logging.jsonl, metrics and events.
    assert Path(task.log_file_path).is_file() and (output / "logging.jsonl").is_file()
    assert TaskLogLine.objects.filter(task=task).count() == lines and lines > 0
    assert TaskMetric.objects.filter(task=task).count() == points and points > 0
    event = task.events.order_by("-pk").first()
    assert event.kind == EventKind.OUTPUTS_DELETED
    assert event.message == f"Outputs deleted: {human_bytes(before - body['output_bytes'])} freed"
    assert event.data["freed_bytes"] == before - body["output_bytes"]

    detail = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()
    assert detail["output_bytes"] == body["output_bytes"] and detail["outputs_deleted_at"] == body["outputs_deleted_at"]


def test_bob_gets_404_for_the_outputs_of_alices_task(completed: FinetuningTask, bob_api: APIClient) -> None:
    assert bob_api.delete(f"/api/finetuning/tasks/{completed.pk}/outputs/").status_code == 404
    assert checkpoint_names(completed) == ["checkpoint-3", "checkpoint-6"]
    assert FinetuningTask.objects.get(pk=completed.pk).outputs_deleted_at is None


def test_the_outputs_of_a_waiting_or_running_task_are_not_deleted(
    make_task: Callable[..., FinetuningTask], alice_api: APIClient
) -> None:
    task = make_task()
    response = alice_api.delete(f"/api/finetuning/tasks/{task.pk}/outputs/")
    assert response.status_code == 400
    assert response.json()["outputs"] == ["the task is waiting to start; stop it first"]
    FinetuningTask.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING)
    response = alice_api.delete(f"/api/finetuning/tasks/{task.pk}/outputs/")
    assert response.status_code == 400 and response.json()["outputs"] == ["the task is running; stop it first"]
    assert FinetuningTask.objects.get(pk=task.pk).outputs_deleted_at is None


def test_the_outputs_are_not_deleted_while_a_deployment_serves_a_checkpoint_or_an_export_runs(
    completed: FinetuningTask, alice: User, alice_api: APIClient
) -> None:
    task = completed
    url = f"/api/finetuning/tasks/{task.pk}/outputs/"
    deployment = Deployment.objects.create(owner=alice, name="chat", task=task, model_path=task.last_checkpoint,
                                           status=DeploymentStatus.RUNNING)
    response = alice_api.delete(url)
    assert response.status_code == 400
    assert response.json()["outputs"] == [f"deployment #{deployment.pk} chat serves a checkpoint of this task; "
                                          "stop it first"]
    Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.STOPPED)

    export = services.task_export_create(task=task)
    response = alice_api.delete(url)
    assert response.status_code == 400
    assert response.json()["outputs"] == [f"export {export.pk} of checkpoint-6 is pending; wait for it to end or "
                                          "stop it first"]
    assert checkpoint_names(task) == ["checkpoint-3", "checkpoint-6"]
    services.task_export_stop(export=export)
    assert alice_api.delete(url).status_code == 200  # the deployment ended and the export failed: nothing holds it
    assert checkpoint_names(task) == []


def test_deleting_outputs_stays_inside_the_task_folder(completed: FinetuningTask, tmp_path: Path) -> None:
    """A link among the checkpoints is removed, never followed: what it points to is untouched."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    output = Path(completed.output_path)
    (output / "checkpoint-99").symlink_to(outside, target_is_directory=True)
    (output / "checkpoint-6" / "escape").symlink_to(outside, target_is_directory=True)

    storage.task_outputs_delete(task=completed)
    assert (outside / "keep.txt").read_text() == "keep"
    assert not (output / "checkpoint-99").is_symlink() and checkpoint_names(completed) == []


# --- after the delete ---------------------------------------------------------------------------------
def test_resume_and_export_after_the_outputs_were_deleted_say_why(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_swift(fail_at_step=5)
    task = run_to_end(make_task())
    monkeypatch.delenv("FAKE_SWIFT_FAIL_AT_STEP")
    assert task.status == TaskStatus.FAILED and task.can_resume
    storage.task_outputs_delete(task=task)

    for action in ("resume", "export"):
        response = alice_api.post(f"/api/finetuning/tasks/{task.pk}/{action}/", {}, format="json")
        assert response.status_code == 400, (action, response.content)
        message = response.json()["checkpoint"][0]
        assert "were deleted on" in message and "create a new task" in message, message
    with pytest.raises(ServiceValidationError) as refused:
        services.finetuning_task_resume(task=task, checkpoint=3)
    assert "were deleted" in str(refused.value)
    assert FinetuningTask.objects.get(pk=task.pk).status == TaskStatus.FAILED
    deploy = alice_api.post("/api/deployments/", {"name": "served", "task": task.pk, "gpu_config": {"cpu": True}},
                            format="json")
    assert deploy.status_code == 400 and "were deleted on" in deploy.json()["task"][0]


# --- the task page --------------------------------------------------------------------------------
def test_the_task_page_shows_the_storage_and_deletes_outputs_after_a_confirmation(
    completed: FinetuningTask, alice: User, bob: User
) -> None:
    client = Client()
    client.force_login(alice)
    url = f"/tasks/{completed.pk}/"
    html = client.get(url).content.decode()
    figure = re.search(r'<dd data-field="outputs"><span title="[^"]*">([^<]*)</span>', html)
    assert figure is not None and figure.group(1) == human_bytes(completed.output_bytes)
    form = re.search(r'<form [^>]*action="/tasks/\d+/outputs/delete/"[^>]*>', html)
    assert form is not None and 'data-confirm="Delete the checkpoints and merged models of' in form.group(0)
    assert 'data-action="delete-outputs"' in html

    other = Client()
    other.force_login(bob)
    assert other.post(f"{url}outputs/delete/").status_code == 404
    assert client.get(f"{url}outputs/delete/").status_code == 405  # only the confirmed form's POST deletes
    assert checkpoint_names(completed) == ["checkpoint-3", "checkpoint-6"]

    response = client.post(f"{url}outputs/delete/")
    assert response.status_code == 302 and response["Location"] == url
    assert checkpoint_names(completed) == []
    page = client.get(url)
    html = page.content.decode()
    assert "data-outputs-deleted" in html and 'data-action="delete-outputs"' not in html
    assert any("were deleted" in str(m) for m in page.context["messages"])
    assert "Outputs deleted:" in html  # the event on the timeline


def test_the_page_offers_no_delete_for_a_waiting_task_and_says_why_when_refused(
    make_task: Callable[..., FinetuningTask], alice: User
) -> None:
    task = make_task()
    client = Client()
    client.force_login(alice)
    assert 'data-action="delete-outputs"' not in client.get(f"/tasks/{task.pk}/").content.decode()
    client.post(f"/tasks/{task.pk}/outputs/delete/")
    messages = [str(m) for m in client.get(f"/tasks/{task.pk}/").context["messages"]]
    assert any("were not deleted: the task is waiting to start; stop it first" in m for m in messages), messages


# --- admin ----------------------------------------------------------------------------------------
def test_staff_find_the_largest_outputs_and_delete_them_with_the_admin_action(
    completed: FinetuningTask, make_task: Callable[..., FinetuningTask], staff: User
) -> None:
    waiting = make_task(name="waiting")
    FinetuningTask.objects.filter(pk=waiting.pk).update(output_bytes=2 * 10**9)
    client = Client()
    client.force_login(staff)
    changelist = "/admin/tasks/finetuningtask/"
    page = client.get(changelist, {"storage": "1gb"})
    assert page.status_code == 200
    assert [t.pk for t in page.context["cl"].result_list] == [waiting.pk]
    assert "2.0 GB" in page.content.decode()
    sorted_page = client.get(changelist, {"o": "-11"})  # the Storage column (11th), largest first
    assert [t.pk for t in sorted_page.context["cl"].result_list][:2] == [waiting.pk, completed.pk]

    response = client.post(changelist, {"action": "delete_outputs", "_selected_action": [completed.pk, waiting.pk]},
                           follow=True)
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("Deleted the outputs of 1 task(s)." in m for m in messages), messages
    assert any(f"#{waiting.pk} waiting" in m and "stop it first" in m for m in messages), messages
    assert checkpoint_names(completed) == []
    assert FinetuningTask.objects.get(pk=completed.pk).outputs_deleted_at is not None
    assert FinetuningTask.objects.get(pk=waiting.pk).outputs_deleted_at is None
    assert os.path.isdir(completed.output_path)  # the folder and its logs stay

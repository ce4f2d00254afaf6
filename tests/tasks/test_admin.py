"""The Django admin: changelists with filters and search, the task change page (read-only runtime
fields, events inline), the stop/delete actions going through the services, and who gets in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone

from accounts.services import api_token_create
from gpus import scheduler
from tasks import services
from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric, TaskStatus

# Tasks start only where a live host offers a slot (here: one CPU slot).
pytestmark = pytest.mark.usefixtures("cpu_host")

TASKS = "/admin/tasks/finetuningtask/"
RUNTIME_INPUTS = ["status", "pid", "command", "output_path", "host", "exit_code", "progress", "log_file_path"]


@pytest.fixture
def staff_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def dataset(alice: User, data_files: dict[str, Path]) -> Dataset:
    path = data_files["sft_messages"]
    upload = SimpleUploadedFile(path.name, path.read_bytes(), content_type="application/jsonl")
    return services.dataset_create(owner=alice, upload=upload, name="colors")


@pytest.fixture
def task(alice: User, local_model: Path, dataset: Dataset) -> FinetuningTask:
    """Alice's task, created by the service and handed to a worker queue (no worker runs)."""
    task = services.finetuning_task_create(
        owner=alice,
        name="colors",
        base_model=str(local_model),
        datasets=[dataset.pk],
        training_args={"max_steps": 4, "logging_steps": 1},
        gpu_config={"cpu": True},
    )
    assert scheduler.dispatch() == [task.run_id]
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED
    return task


@pytest.fixture
def records(task: FinetuningTask, alice: User) -> FinetuningTask:
    """A log line, a metric point and an API token next to the task's two events."""
    TaskLogLine.objects.create(task=task, seq=1, text="loading the model", created_at=timezone.now())
    TaskMetric.objects.create(task=task, step=1, loss=1.25, learning_rate=1e-4)
    api_token_create(user=alice, name="colors notebook")
    assert list(task.events.values_list("kind", flat=True)) == ["created", "queued"]
    return task


def post_action(client: Client, action: str, *ids: int) -> Any:
    return client.post(TASKS, {"action": action, "_selected_action": [str(i) for i in ids], "index": "0"})


# --- changelists ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "query", "expected"),
    [
        (TASKS, "", 1),
        (TASKS, "status=running", 0),
        (TASKS, "status=queued", 1),
        (TASKS, "status__exact=running", 0),
        (TASKS, "status__exact=queued", 1),
        (TASKS, "q=colors", 1),
        (TASKS, "q=zebra", 0),
        (TASKS, "owner__id__exact={alice}", 1),
        (TASKS, "owner__id__exact={bob}", 0),
        (TASKS, "task_type__exact=sft&train_type__exact=lora", 1),
        ("/admin/tasks/dataset/", "", 1),
        ("/admin/tasks/dataset/", "q=colors", 1),
        ("/admin/tasks/dataset/", "q=zebra", 0),
        ("/admin/tasks/dataset/", "format__exact=messages", 1),
        ("/admin/tasks/dataset/", "format__exact=preference", 0),
        ("/admin/tasks/dataset/", "owner__id__exact={alice}", 1),
        ("/admin/tasks/dataset/", "owner__id__exact={bob}", 0),
        ("/admin/tasks/tasklogline/", "", 1),
        ("/admin/tasks/tasklogline/", "task__status__exact=running", 0),
        ("/admin/tasks/tasklogline/", "task__status__exact=queued", 1),
        ("/admin/tasks/tasklogline/", "q=colors", 1),
        ("/admin/tasks/tasklogline/", "q=zebra", 0),
        ("/admin/tasks/tasklogline/", "task__owner__id__exact={alice}", 1),
        ("/admin/tasks/tasklogline/", "task__owner__id__exact={bob}", 0),
        ("/admin/tasks/taskmetric/", "", 1),
        ("/admin/tasks/taskmetric/", "kind__exact=eval", 0),
        ("/admin/tasks/taskmetric/", "q=colors", 1),
        ("/admin/tasks/taskmetric/", "q=zebra", 0),
        ("/admin/tasks/taskmetric/", "task__owner__id__exact={alice}", 1),
        ("/admin/tasks/taskmetric/", "task__owner__id__exact={bob}", 0),
        ("/admin/tasks/taskevent/", "", 2),
        ("/admin/tasks/taskevent/", "kind__exact=queued", 1),
        ("/admin/tasks/taskevent/", "q=colors", 2),
        ("/admin/tasks/taskevent/", "q=zebra", 0),
        ("/admin/tasks/taskevent/", "task__owner__id__exact={alice}", 2),
        ("/admin/tasks/taskevent/", "task__owner__id__exact={bob}", 0),
        ("/admin/accounts/apitoken/", "", 1),
        ("/admin/accounts/apitoken/", "q=colors", 1),
        ("/admin/accounts/apitoken/", "q=zebra", 0),
        ("/admin/accounts/apitoken/", "revoked_at__isempty=1", 1),
        ("/admin/accounts/apitoken/", "revoked_at__isempty=0", 0),
        ("/admin/accounts/apitoken/", "user__id__exact={alice}", 1),
        ("/admin/accounts/apitoken/", "user__id__exact={bob}", 0),
    ],
)
def test_staff_see_every_changelist_with_filters_and_search(
    staff_client: Client, records: FinetuningTask, alice: User, bob: User, url: str, query: str, expected: int
) -> None:
    query = query.format(alice=alice.pk, bob=bob.pk)
    response = staff_client.get(f"{url}?{query}" if query else url)
    assert response.status_code == 200, response.get("Location")
    assert response.context["cl"].result_count == expected


def test_the_task_changelist_shows_the_task_and_its_owner(staff_client: Client, task: FinetuningTask) -> None:
    response = staff_client.get(TASKS)
    assert response.status_code == 200
    html = response.content.decode()
    assert f"{TASKS}{task.pk}/change/" in html
    assert "alice" in html


# --- the change page ------------------------------------------------------------------------------
def test_the_task_change_page_shows_its_events_inline(staff_client: Client, task: FinetuningTask) -> None:
    response = staff_client.get(f"{TASKS}{task.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="events-TOTAL_FORMS"' in html
    assert "handed to its worker" in html
    assert "Created" in html
    (inline,) = response.context["inline_admin_formsets"]
    assert [form.instance.kind for form in inline.formset.forms] == ["created", "queued"]


def test_runtime_fields_are_read_only_on_the_change_form(staff_client: Client, task: FinetuningTask) -> None:
    html = staff_client.get(f"{TASKS}{task.pk}/change/").content.decode()
    for field in RUNTIME_INPUTS:
        assert f'name="{field}"' not in html, field
    # The runtime values are shown, and the definition fields are editable.
    assert task.output_path in html
    assert 'name="name"' in html
    assert 'name="priority"' in html


def _change_form_data(response: Any) -> dict[str, Any]:
    """What the browser would post back for the change form as rendered."""
    data: dict[str, Any] = {}
    form = response.context["adminform"].form
    for name in form.fields:
        value = form[name].value()
        data[name] = "" if value is None else value
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for bound in formset.management_form:
            data[bound.html_name] = bound.value()
        for sub in formset.forms:
            for bound in sub:
                value = bound.value()
                data[bound.html_name] = "" if value is None else value
    return data


def test_posting_runtime_fields_does_not_change_them(staff_client: Client, task: FinetuningTask) -> None:
    url = f"{TASKS}{task.pk}/change/"
    data = _change_form_data(staff_client.get(url))
    assert "status" not in data and "pid" not in data
    data.update(name="renamed", status="running", pid="4242", command="rm -rf /", output_path="/etc")
    response = staff_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    row = FinetuningTask.objects.get(pk=task.pk)
    assert row.name == "renamed"
    assert row.status == TaskStatus.QUEUED
    assert row.pid is None
    assert row.command == task.command
    assert row.output_path == task.output_path


def test_the_change_form_does_not_store_a_definition_the_service_would_refuse(
    staff_client: Client, task: FinetuningTask
) -> None:
    """The add page is closed because creation must be validated; the change form must not be a way
    around that. Either the definition fields are read-only or they are validated: whichever, a
    path outside the model roots and a non-allow-listed training argument must not be stored, and
    ``base_model`` must keep naming the model that trains (``model_path``)."""
    url = f"{TASKS}{task.pk}/change/"
    data = _change_form_data(staff_client.get(url))
    data.update(base_model="/etc", training_args='{"--output_dir": "/tmp/x"}')
    staff_client.post(url, data)
    row = FinetuningTask.objects.get(pk=task.pk)
    assert row.base_model == task.base_model
    assert row.training_args == task.training_args
    assert row.model_path == task.model_path


def test_the_add_page_for_tasks_is_forbidden(staff_client: Client, task: FinetuningTask) -> None:
    assert staff_client.get(f"{TASKS}add/").status_code == 403
    assert staff_client.post(f"{TASKS}add/", {"name": "raw"}).status_code == 403
    assert FinetuningTask.objects.count() == 1


# --- actions --------------------------------------------------------------------------------------
def test_the_task_actions_are_stop_and_delete_but_not_the_raw_delete(
    staff_client: Client, task: FinetuningTask
) -> None:
    response = staff_client.get(TASKS)
    actions = [value for value, _label in response.context["action_form"].fields["action"].choices]
    assert "stop_tasks" in actions
    assert "delete_tasks" in actions
    assert "delete_selected" not in actions


def test_queue_actions_hold_release_and_move_priority_and_report_refusals(
    staff_client: Client, task: FinetuningTask, alice: User, local_model: Path, dataset: Dataset
) -> None:
    waiting = services.finetuning_task_create(
        owner=alice, name="waiting", base_model=str(local_model), datasets=[dataset.pk], gpu_config={"cpu": True},
    )  # the only CPU slot is taken by `task`, so this one waits
    post_action(staff_client, "hold_tasks", waiting.pk)
    waiting.refresh_from_db()
    assert waiting.held and waiting.status == TaskStatus.PENDING
    post_action(staff_client, "release_tasks", waiting.pk)
    post_action(staff_client, "raise_priority", waiting.pk)
    waiting.refresh_from_db()
    assert not waiting.held and waiting.priority == 6
    # The queued task cannot change priority any more: the action says why and changes nothing.
    post_action(staff_client, "lower_priority", task.pk)
    messages = [str(m) for m in staff_client.get(TASKS).context["messages"]]
    assert any("only a waiting task's priority can change" in m for m in messages)
    assert FinetuningTask.objects.get(pk=task.pk).priority == 5


def test_a_posted_delete_selected_action_deletes_nothing(staff_client: Client, task: FinetuningTask) -> None:
    post_action(staff_client, "delete_selected", task.pk)
    assert FinetuningTask.objects.filter(pk=task.pk).exists()


def test_the_stop_action_stops_a_queued_task(staff_client: Client, task: FinetuningTask) -> None:
    response = post_action(staff_client, "stop_tasks", task.pk)
    assert response.status_code == 302
    assert response.url == TASKS
    task.refresh_from_db()
    assert task.status == TaskStatus.STOPPED
    assert task.stop_requested_at is not None and task.finished_at is not None
    assert list(task.events.values_list("kind", flat=True)) == ["created", "queued", "stopped"]
    messages = [str(m) for m in staff_client.get(TASKS).context["messages"]]
    assert messages == ["Asked 1 task(s) to stop."]


def test_stopping_an_already_stopped_task_changes_nothing(staff_client: Client, task: FinetuningTask) -> None:
    post_action(staff_client, "stop_tasks", task.pk)
    finished_at = FinetuningTask.objects.get(pk=task.pk).finished_at
    assert post_action(staff_client, "stop_tasks", task.pk).status_code == 302
    row = FinetuningTask.objects.get(pk=task.pk)
    assert row.status == TaskStatus.STOPPED and row.finished_at == finished_at
    assert row.events.filter(kind="stopped").count() == 1


def test_the_delete_action_removes_the_task_and_its_records(
    staff_client: Client, records: FinetuningTask, dataset: Dataset
) -> None:
    task = records
    response = post_action(staff_client, "delete_tasks", task.pk)
    assert response.status_code == 302
    assert not FinetuningTask.objects.filter(pk=task.pk).exists()
    assert not TaskEvent.objects.filter(task_id=task.pk).exists()
    assert not TaskLogLine.objects.filter(task_id=task.pk).exists()
    assert not TaskMetric.objects.filter(task_id=task.pk).exists()
    # The dataset it trained on is the owner's and stays.
    assert Dataset.objects.filter(pk=dataset.pk).exists()
    assert Path(dataset.path).exists()
    messages = [str(m) for m in staff_client.get(TASKS).context["messages"]]
    assert messages == ["Deleted 1 task(s); model outputs were kept on disk."]


def test_deleting_from_the_change_page_goes_through_the_service(staff_client: Client, records: FinetuningTask) -> None:
    task = records
    response = staff_client.post(f"{TASKS}{task.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not FinetuningTask.objects.filter(pk=task.pk).exists()
    assert not TaskEvent.objects.filter(task_id=task.pk).exists()


# --- who gets in ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["{id}/change/", "", "{id}/delete/"])
def test_a_non_staff_user_is_sent_to_the_admin_login(alice: User, task: FinetuningTask, suffix: str) -> None:
    client = Client()
    client.force_login(alice)
    url = TASKS + suffix.format(id=task.pk)
    response = client.get(url)
    assert response.status_code == 302
    assert response.url == f"/admin/login/?next={url}"
    assert b"colors" not in response.content


def test_a_non_staff_user_cannot_run_an_action(alice: User, task: FinetuningTask) -> None:
    client = Client()
    client.force_login(alice)
    response = post_action(client, "delete_tasks", task.pk)
    assert response.status_code == 302
    assert response.url.startswith("/admin/login/")
    assert FinetuningTask.objects.get(pk=task.pk).status == TaskStatus.QUEUED

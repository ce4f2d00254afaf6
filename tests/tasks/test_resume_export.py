"""Resume from a checkpoint and export (merge LoRA) with the fake ``swift``: the service rules, the
API (400s that name the field, 404 for another user's task), the runner following a resumed run's
new versioned folder, and the export runner."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.utils import timezone
from django_q.models import OrmQ
from rest_framework.test import APIClient

from gpus import supervisor
from gpus.models import Reservation, Run, RunStatus
from gpus.scheduler import dispatch as dispatch_pending
from gpus.scheduler import worker_queue
from tasks import services
from tasks.models import (
    Dataset,
    ExportStatus,
    FinetuningTask,
    TaskExport,
    TaskLogLine,
    TaskMetric,
    TaskStatus,
    TrainType,
)
from tests.conftest import wait_for
from tests.runs import run_export as supervise_export
from tests.runs import run_task, run_to_end
from tests.tasks.conftest import ARGS

pytestmark = pytest.mark.usefixtures("cpu_host")


def run_export(export_id: int) -> str:
    """Dispatch (an export books a CPU slot like any run; the on-commit dispatch does not run inside a
    test transaction) and supervise the export here."""
    dispatch_pending()
    return supervise_export(export_id)


@pytest.fixture
def failed_at_step_5(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> FinetuningTask:
    """A task that saved checkpoint-3, logged steps 1-4, then failed at step 5."""
    fake_swift(fail_at_step=5)
    task = run_to_end(make_task())
    assert task.status == TaskStatus.FAILED
    monkeypatch.delenv("FAKE_SWIFT_FAIL_AT_STEP")
    return task


def train_steps(task: FinetuningTask) -> list[int]:
    return list(TaskMetric.objects.filter(task=task, kind="train").order_by("step").values_list("step", flat=True))


def log_seqs(task: FinetuningTask) -> list[int]:
    return list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))


# --- resume ---------------------------------------------------------------------------------------
def test_a_resumed_run_continues_the_steps_without_duplicates_and_the_log_sequence_without_gaps(
    failed_at_step_5: FinetuningTask,
) -> None:
    task = failed_at_step_5
    first_checkpoint = Path(task.last_checkpoint)
    assert first_checkpoint.name == "checkpoint-3" and first_checkpoint.parent == Path(task.output_path)
    assert train_steps(task) == [1, 2, 3, 4]
    seqs_before = log_seqs(task)
    log_size_before = Path(task.log_file_path).stat().st_size

    task = services.finetuning_task_resume(task=task)
    assert task.status == TaskStatus.PENDING and task.run_number == 2
    assert task.resume_from == str(first_checkpoint) and task.current_step == 3 and task.progress == 50.0
    assert task.error_message == "" and task.exit_code is None and task.finished_at is None
    assert train_steps(task) == [1, 2, 3]  # step 4 is trained again by the new run

    task = run_to_end(task)
    assert task.status == TaskStatus.COMPLETED, task.error_message
    assert train_steps(task) == [1, 2, 3, 4, 5, 6]
    assert task.current_step == 6 and task.progress == 100.0
    # The new run wrote into a versioned folder under the output folder, which the runner followed.
    run_dir = Path(task.run_dir)
    assert run_dir.parent == Path(task.output_path) and run_dir.name.startswith("v0-")
    assert Path(task.last_checkpoint) == run_dir / "checkpoint-6"
    assert task.command[task.command.index("--resume_from_checkpoint") + 1] == str(first_checkpoint)
    assert task.command[task.command.index("--add_version") + 1] == "true"
    # One history: the sequence continues after the first run's last line, with no gap or repeat.
    seqs = log_seqs(task)
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[: len(seqs_before)] == seqs_before
    assert task.last_log_seq == seqs[-1]
    new_lines = list(TaskLogLine.objects.filter(task=task, seq__gt=seqs_before[-1]).values_list("text", flat=True))
    assert new_lines[0].startswith("--- run 2: resuming from") and new_lines[1].startswith("$ ")
    assert Path(task.log_file_path).stat().st_size > log_size_before  # appended, the first run's log is kept
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds.count("started") == 2 and kinds.count("queued") == 2
    assert kinds.index("failed") < kinds.index("resumed") < len(kinds) - 1 and kinds[-1] == "completed"
    assert task.events.get(kind="resumed").message.startswith("Resumed from checkpoint-3")


def test_a_resume_is_a_new_run_of_the_same_task_and_the_old_run_keeps_how_it_ended(
    failed_at_step_5: FinetuningTask,
) -> None:
    task = failed_at_step_5
    first = Run.objects.get(pk=task.run_id)
    assert first.kind == "train" and first.subject_id == task.pk and first.number == task.run_number == 1
    assert first.status == RunStatus.FAILED and first.error and first.finished_at is not None
    assert first.exit_code not in (None, 0) and not Reservation.objects.filter(run=first).exists()
    first_error = first.error

    task = services.finetuning_task_resume(task=task)
    assert task.run_id != first.pk
    second = Run.objects.get(pk=task.run_id)
    assert second.kind == "train" and second.subject_id == task.pk and second.owner_id == task.owner_id
    assert second.number == task.run_number == 2 and second.status == RunStatus.PENDING
    assert second.error == "" and second.exit_code is None and second.pid is None and second.finished_at is None
    # The first run is history: its end, error and exit code stay as they were.
    first.refresh_from_db()
    assert first.status == RunStatus.FAILED and first.error == first_error and first.finished_at is not None
    assert Run.objects.filter(kind="train", subject_id=task.pk).count() == 2

    task = run_to_end(task)
    assert task.status == TaskStatus.COMPLETED and task.run_id == second.pk and task.run.number == 2
    second.refresh_from_db()
    first.refresh_from_db()
    assert second.status == RunStatus.SUCCEEDED and second.exit_code == 0
    assert first.status == RunStatus.FAILED and first.error == first_error
    # The task's fields read its current run: the failure of run 1 is not the completed task's error.
    assert task.error_message == "" and task.exit_code == 0


def test_the_api_lists_checkpoints_of_every_run_with_step_time_and_size(
    failed_at_step_5: FinetuningTask, alice_api: APIClient
) -> None:
    task = run_to_end(services.finetuning_task_resume(task=failed_at_step_5))
    detail = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()
    checkpoints = detail["checkpoints"]
    assert [(c["step"], c["run"] != "") for c in checkpoints] == [(3, False), (6, True)]
    assert all(c["size_bytes"] > 0 and c["saved_at"] and Path(c["path"]).is_absolute() for c in checkpoints)
    assert checkpoints[1]["path"] == detail["last_checkpoint"] and detail["run_number"] == 2
    assert detail["exports"] == [] and detail["can_export"] is True and detail["can_resume"] is False
    # The list stays light: no folder scan per listed task.
    listed = alice_api.get("/api/finetuning/tasks/").json()["results"][0]
    assert "checkpoints" not in listed and listed["run_number"] == 2


@pytest.mark.django_db(transaction=True)
def test_a_stopped_run_resumes_from_its_checkpoint_and_the_steps_it_had_logged_after_it_are_replaced(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_swift(step_seconds=0.15)
    # A checkpoint every 10 steps (1.5 s) and the stop asked for at step 12 or later: the stop (checked
    # every 0.5 s) lands well before checkpoint-20, so steps after the last checkpoint were logged.
    # (With a checkpoint every 4 steps, a stop under load could land right on one.)
    task = make_task(training_args={**ARGS, "max_steps": 30, "save_steps": 10})

    def supervise() -> None:
        try:
            run_task(task.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=supervise)
    thread.start()
    wait_for(lambda: FinetuningTask.objects.filter(pk=task.pk, current_step__gte=12).exclude(last_checkpoint="")
             .exists(), timeout=30)
    services.finetuning_task_stop(task=task)
    thread.join(timeout=30)
    task.refresh_from_db()
    assert task.status == TaskStatus.STOPPED
    checkpoint_step = int(Path(task.last_checkpoint).name.split("-")[1])
    logged = train_steps(task)
    assert logged[-1] > checkpoint_step  # steps after the checkpoint were logged, then lost with the stop

    monkeypatch.setenv("FAKE_SWIFT_STEP_SECONDS", "0.01")
    task = services.finetuning_task_resume(task=task)
    assert train_steps(task) == list(range(1, checkpoint_step + 1))
    task = run_to_end(task)
    assert task.status == TaskStatus.COMPLETED, task.error_message
    assert train_steps(task) == list(range(1, 31))
    seqs = log_seqs(task)
    assert seqs == list(range(1, len(seqs) + 1))


def test_resume_by_step_or_by_folder_and_refusals_that_name_the_field(
    failed_at_step_5: FinetuningTask, alice_api: APIClient, tmp_path: Path
) -> None:
    url = f"/api/finetuning/tasks/{failed_at_step_5.pk}/resume/"
    outside = tmp_path / "checkpoint-3"
    outside.mkdir()
    for body, field, words in [
        ({"checkpoint": 99}, "checkpoint", "no checkpoint at step 99"),
        ({"checkpoint": str(outside)}, "checkpoint", "not inside this task's output folder"),
        ({"checkpoint": "../../../../etc"}, "checkpoint", "not inside this task's output folder"),
        ({"checkpoint": "images"}, "checkpoint", "not a checkpoint of this task"),
        ({"checkpoint": True}, "checkpoint", "step number or a checkpoint folder"),
    ]:
        response = alice_api.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert words in response.json()[field][0], response.json()
    assert FinetuningTask.objects.get(pk=failed_at_step_5.pk).status == TaskStatus.FAILED
    response = alice_api.post(url, {"checkpoint": "checkpoint-3"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["status"] in ("pending", "queued") and response.json()["resume_from"].endswith(
        "/checkpoint-3")


def test_resume_is_refused_for_waiting_running_and_completed_tasks_and_without_a_checkpoint(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queued = make_task()
    response = alice_api.post(f"/api/finetuning/tasks/{queued.pk}/resume/", {}, format="json")
    assert response.status_code == 400 and "only a stopped or failed task" in response.json()["status"][0]
    FinetuningTask.objects.filter(pk=queued.pk).update(status=TaskStatus.RUNNING)
    response = alice_api.post(f"/api/finetuning/tasks/{queued.pk}/resume/", {}, format="json")
    assert response.status_code == 400 and "the task is running" in response.json()["status"][0]
    FinetuningTask.objects.filter(pk=queued.pk).update(status=TaskStatus.QUEUED)
    services.finetuning_task_stop(task=queued)  # gives the CPU slot back

    completed = run_to_end(make_task(name="done"))
    assert completed.status == TaskStatus.COMPLETED
    response = alice_api.post(f"/api/finetuning/tasks/{completed.pk}/resume/", {}, format="json")
    assert response.status_code == 400 and "the task is completed" in response.json()["status"][0]

    monkeypatch.setenv("FAKE_SWIFT_FAIL_AT_STEP", "2")  # fails before its first checkpoint (step 3)
    early = run_to_end(make_task(name="early"))
    assert early.status == TaskStatus.FAILED and early.last_checkpoint == ""
    response = alice_api.post(f"/api/finetuning/tasks/{early.pk}/resume/", {}, format="json")
    assert response.status_code == 400 and "no checkpoint yet" in response.json()["checkpoint"][0]
    assert FinetuningTask.objects.get(pk=early.pk).status == TaskStatus.FAILED


def test_a_resume_through_the_api_goes_back_to_the_queue(
    failed_at_step_5: FinetuningTask, alice_api: APIClient, django_capture_on_commit_callbacks: Any
) -> None:
    OrmQ.objects.all().delete()
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.post(f"/api/finetuning/tasks/{failed_at_step_5.pk}/resume/", format="json")
    assert response.status_code == 200
    row = FinetuningTask.objects.get(pk=failed_at_step_5.pk)
    assert row.status == TaskStatus.QUEUED and OrmQ.objects.count() == 1  # the scheduler started it like any task


def test_a_checkpoint_without_trainer_state_cannot_be_resumed_from(failed_at_step_5: FinetuningTask) -> None:
    (Path(failed_at_step_5.last_checkpoint) / "trainer_state.json").unlink()
    with pytest.raises(services.ServiceValidationError) as caught:
        services.finetuning_task_resume(task=failed_at_step_5)
    assert "incomplete" in caught.value.errors["checkpoint"]


def test_concurrent_resumes_start_one_run(failed_at_step_5: FinetuningTask) -> None:
    services.finetuning_task_resume(task=failed_at_step_5)
    stale = FinetuningTask.objects.get(pk=failed_at_step_5.pk)
    stale.status = TaskStatus.FAILED  # what a second request read before the first one's update
    with pytest.raises(services.ServiceValidationError):
        services.finetuning_task_resume(task=stale)
    assert FinetuningTask.objects.get(pk=failed_at_step_5.pk).run_number == 2


# --- ownership --------------------------------------------------------------------------------------
def test_bob_gets_404_for_resume_export_exports_and_download_of_alices_task(
    failed_at_step_5: FinetuningTask, alice_api: APIClient, bob_api: APIClient
) -> None:
    export = services.task_export_create(task=failed_at_step_5)
    run_export(export.pk)
    task_id = failed_at_step_5.pk
    assert alice_api.get(f"/api/finetuning/exports/{export.pk}/download/").status_code == 200
    for method, url in [
        ("post", f"/api/finetuning/tasks/{task_id}/resume/"),
        ("post", f"/api/finetuning/tasks/{task_id}/export/"),
        ("get", f"/api/finetuning/tasks/{task_id}/exports/"),
        ("get", f"/api/finetuning/exports/{export.pk}/"),
        ("get", f"/api/finetuning/exports/{export.pk}/download/"),
    ]:
        response = getattr(bob_api, method)(url, {}, format="json") if method == "post" else bob_api.get(url)
        assert response.status_code == 404, (url, response.status_code)
    assert FinetuningTask.objects.get(pk=task_id).status == TaskStatus.FAILED
    assert TaskExport.objects.filter(task_id=task_id).count() == 1


# --- export ---------------------------------------------------------------------------------------
def test_an_export_merges_the_last_checkpoint_on_the_cpu_and_can_be_downloaded(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient,
    tmp_path: Path, django_capture_on_commit_callbacks: Any,
) -> None:
    record = tmp_path / "launches.jsonl"
    fake_swift(record=record)
    task = run_to_end(make_task())
    OrmQ.objects.all().delete()
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.post(f"/api/finetuning/tasks/{task.pk}/export/", {}, format="json")
    assert response.status_code == 201, response.content
    created = response.json()
    checkpoint = Path(task.last_checkpoint)
    assert created["status"] == "pending" and created["checkpoint"] == str(checkpoint)
    assert created["output_path"] == f"{checkpoint}-merged" and created["download_url"] is None
    export = TaskExport.objects.get(pk=created["id"])
    # An export is a run in the CPU lane: it booked this host's CPU slot and its job went to that host.
    assert list(Reservation.objects.filter(run=export.run_id).values_list("cpu_slot", flat=True)) == [0]
    (job,) = OrmQ.objects.all()
    assert job.key == worker_queue(task.host) and job.func() == "gpus.jobs.run" and job.args() == (export.run_id,)

    assert run_export(created["id"]) == f"run {export.run_id} (export {created['id']}): succeeded"
    assert run_export(created["id"]).endswith("not claimed (already taken, stopped or ended)")
    assert not Reservation.objects.filter(run=export.run_id).exists()
    export = TaskExport.objects.get(pk=created["id"])
    merged = Path(export.output_path)
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert export.size_bytes and export.size_bytes > 0 and export.exit_code == 0
    assert export.command[1:] == ["export", "--adapters", str(checkpoint), "--merge_lora", "true",
                                  "--output_dir", str(merged)]
    launch = [json.loads(line) for line in record.read_text().splitlines()][-1]
    assert launch["argv"][0] == "export"
    assert launch["env"]["CUDA_VISIBLE_DEVICES"] == "" and launch["env"]["HF_HUB_OFFLINE"] == "1"
    assert "Successfully merged LoRA" in export.log_text

    listed = alice_api.get(f"/api/finetuning/tasks/{task.pk}/exports/").json()
    assert [e["id"] for e in listed] == [export.pk] and listed[0]["status"] == "completed"
    assert "Successfully merged LoRA" in listed[0]["log"]
    detail = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()
    assert detail["exports"][0]["download_url"] == f"/api/finetuning/exports/{export.pk}/download/"
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds[-2:] == ["export_queued", "exported"]

    download = alice_api.get(f"/api/finetuning/exports/{export.pk}/download/")
    assert download.status_code == 200 and download["Content-Type"] == "application/zip"
    assert f"{merged.name}.zip" in download["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        assert {f"{merged.name}/config.json", f"{merged.name}/model.safetensors"} <= names
        assert archive.read(f"{merged.name}/config.json") == (merged / "config.json").read_bytes()

    response = alice_api.post(f"/api/finetuning/tasks/{task.pk}/export/", {"checkpoint": 6}, format="json")
    assert response.status_code == 400 and "exported already" in response.json()["checkpoint"][0]


def test_an_export_of_a_named_checkpoint_and_refusals(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient
) -> None:
    task = run_to_end(make_task())
    url = f"/api/finetuning/tasks/{task.pk}/export/"
    response = alice_api.post(url, {"checkpoint": 3}, format="json")
    assert response.status_code == 201 and response.json()["checkpoint"].endswith("/checkpoint-3")
    again = alice_api.post(url, {"checkpoint": "checkpoint-3"}, format="json")
    assert again.status_code == 400 and "being exported already" in again.json()["checkpoint"][0]
    response = alice_api.post(url, {"checkpoint": "/etc"}, format="json")
    assert response.status_code == 400 and "not inside this task's output folder" in response.json()["checkpoint"][0]
    pending = alice_api.get(f"/api/finetuning/exports/{TaskExport.objects.get().pk}/download/")
    assert pending.status_code == 400 and "the export is pending" in pending.json()["status"][0]


def test_a_full_fine_tune_has_nothing_to_export(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient
) -> None:
    task = run_to_end(make_task(train_type=TrainType.FULL))
    assert task.status == TaskStatus.COMPLETED
    response = alice_api.post(f"/api/finetuning/tasks/{task.pk}/export/", {}, format="json")
    assert response.status_code == 400 and "full fine-tune" in response.json()["train_type"][0]
    assert not TaskExport.objects.exists()


def test_a_failed_export_says_why_and_leaves_no_partial_folder(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = run_to_end(make_task())
    export = services.task_export_create(task=task)
    monkeypatch.setenv("FAKE_SWIFT_EXIT_CODE", "1")  # the fake writes the folder, then fails
    run_export(export.pk)
    export.refresh_from_db()
    assert export.status == ExportStatus.FAILED and export.exit_code == 1
    assert "fake failure requested" in export.error_message
    assert not Path(export.output_path).exists()
    assert task.events.order_by("-id").first().kind == "export_failed"
    monkeypatch.delenv("FAKE_SWIFT_EXIT_CODE")
    retry = services.task_export_create(task=task)  # a failed export does not block another try
    run_export(retry.pk)
    retry.refresh_from_db()
    assert retry.status == ExportStatus.COMPLETED and Path(retry.output_path, "config.json").is_file()


def test_auto_export_queues_an_export_when_a_lora_task_completes(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice_api: APIClient,
    local_model: Path, dataset: Dataset,
) -> None:
    task = run_to_end(make_task(auto_export=True))
    assert task.status == TaskStatus.COMPLETED
    export = TaskExport.objects.get(task=task)
    assert export.status == ExportStatus.PENDING and export.checkpoint == task.last_checkpoint
    assert not TaskExport.objects.exclude(task=task).exists()
    body = {"name": "full", "base_model": str(local_model), "datasets": [dataset.pk], "train_type": "full",
            "training_args": ARGS, "gpu_config": {"cpu": True}, "auto_export": True}
    response = alice_api.post("/api/finetuning/tasks/", body, format="json")
    assert response.status_code == 400 and "full fine-tune needs no export" in response.json()["auto_export"][0]
    body.update(train_type="lora", name="lora")
    created = alice_api.post("/api/finetuning/tasks/", body, format="json").json()
    assert created["auto_export"] is True


def test_with_no_live_host_an_export_waits_for_a_cpu_slot(failed_at_step_5: FinetuningTask) -> None:
    """An export is a run in the CPU lane: with no live host it is accepted and waits (pending) for a
    CPU slot, like any run, then books one when a host is back."""
    from gpus.models import Host

    Host.objects.update(last_seen_at=None)
    export = services.task_export_create(task=failed_at_step_5)
    assert dispatch_pending() == [] and not Reservation.objects.exists()
    export.refresh_from_db()
    assert export.status == ExportStatus.PENDING and export.run.status == RunStatus.PENDING and export.host == ""
    Host.objects.update(last_seen_at=timezone.now())
    assert dispatch_pending() == [export.run_id]
    assert Reservation.objects.get(run=export.run_id).cpu_slot == 0


def test_an_export_whose_worker_died_is_failed_by_the_reconciler(failed_at_step_5: FinetuningTask) -> None:
    export = services.task_export_create(task=failed_at_step_5)
    assert dispatch_pending() == [export.run_id]
    Path(export.output_path).mkdir()
    # Its supervisor claimed it, then the worker died (its pid is gone).
    TaskExport.objects.filter(pk=export.pk).update(status=ExportStatus.RUNNING)
    assert Run.objects.filter(pk=export.run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, runner_pid=2**22 + 12345, started_at=timezone.now())
    export.refresh_from_db()
    assert supervisor.reconcile(host=export.host) == [export.run_id]
    export.refresh_from_db()
    assert export.status == ExportStatus.FAILED and "worker running this export stopped" in export.error_message
    assert not Path(export.output_path).exists()
    assert not Reservation.objects.filter(run=export.run_id).exists()  # its CPU slot is free again


def test_deleting_a_task_stops_its_waiting_export(failed_at_step_5: FinetuningTask) -> None:
    export = services.task_export_create(task=failed_at_step_5)
    assert dispatch_pending() == [export.run_id]  # its job is in the worker's queue already
    services.finetuning_task_delete(task=failed_at_step_5)
    assert not TaskExport.objects.filter(pk=export.pk).exists()
    assert not Run.objects.filter(pk=export.run_id).exists() and not Reservation.objects.exists()
    assert supervisor.run_job(export.run_id).endswith("not claimed (already taken, stopped or ended)")


# --- the task page ----------------------------------------------------------------------------------
def test_the_task_page_lists_checkpoints_and_resumes_and_exports_through_the_services(
    failed_at_step_5: FinetuningTask, alice: User
) -> None:
    client = Client()
    client.force_login(alice)
    url = f"/tasks/{failed_at_step_5.pk}/"
    html = client.get(url).content.decode()
    assert 'data-action="resume"' in html and "checkpoint-3" in html and 'data-action="export"' in html
    resume_form = re.search(r"<form [^>]*data-resume-form[^>]*>", html)
    assert resume_form is not None and " hidden" not in resume_form.group(0)  # shown: the task may resume
    response = client.post(f"{url}export/", {"checkpoint": failed_at_step_5.last_checkpoint})
    assert response.status_code == 302 and TaskExport.objects.filter(task=failed_at_step_5).count() == 1
    response = client.post(f"{url}resume/")
    assert response.status_code == 302
    assert FinetuningTask.objects.get(pk=failed_at_step_5.pk).status in (TaskStatus.PENDING, TaskStatus.QUEUED)
    page = client.get(url).content.decode()
    assert "Export of checkpoint-3 queued" in page or "export_queued" in page
    assert client.post(f"/tasks/{failed_at_step_5.pk}/resume/").status_code == 302  # refused, with a message
    messages = [str(m) for m in client.get(url).context["messages"]]
    assert any("cannot be resumed" in m for m in messages), messages


def test_bob_cannot_resume_or_export_alices_task_from_the_pages(failed_at_step_5: FinetuningTask, bob: User) -> None:
    client = Client()
    client.force_login(bob)
    assert client.post(f"/tasks/{failed_at_step_5.pk}/resume/").status_code == 404
    assert client.post(f"/tasks/{failed_at_step_5.pk}/export/").status_code == 404
    assert FinetuningTask.objects.get(pk=failed_at_step_5.pk).status == TaskStatus.FAILED
    assert not TaskExport.objects.exists()
    assert os.environ.get("FAKE_SWIFT_FAIL_AT_STEP") is None


async def test_the_zip_download_streams_piece_by_piece_under_asgi(tmp_path: Path) -> None:
    """Under daphne the response must be an asynchronous iterator: Django would read a synchronous
    one to the end, into memory, before sending a byte."""
    from django.test import AsyncRequestFactory

    from core.streaming import zip_stream_response

    folder = tmp_path / "checkpoint-6-merged"
    (folder / "sub").mkdir(parents=True)
    weights = os.urandom(3 * (1 << 20) + 17)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "sub" / "config.json").write_text("{}")
    (folder / "link.json").symlink_to("/etc/hostname")  # never followed out of the folder
    response = zip_stream_response(AsyncRequestFactory().get("/"), folder, filename="m.zip")
    assert response.is_async
    chunks = [chunk async for chunk in response]
    assert len(chunks) > 3 and max(len(c) for c in chunks) <= (1 << 20) + 4096
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["checkpoint-6-merged/model.safetensors",
                                              "checkpoint-6-merged/sub/config.json"]
        assert archive.read("checkpoint-6-merged/model.safetensors") == weights

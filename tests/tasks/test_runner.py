"""The runner with the fake ``swift``: completion, failure, stop, re-delivery, crash recovery."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone

from gpus import supervisor
from gpus.models import Run, RunStatus
from gpus.process import group_members
from gpus.scheduler import dispatch as dispatch_pending
from tasks import services
from tasks.command import build_env
from tasks.models import Dataset, FinetuningTask, TaskLogLine, TaskMetric, TaskStatus
from tests.conftest import FAKE_SWIFT, announce_host, wait_for
from tests.runs import end_run, run_task, stage_task
from tests.tasks.conftest import ARGS

# Tasks start only where a live host offers a slot (here: one CPU slot).
pytestmark = pytest.mark.usefixtures("cpu_host")


@pytest.fixture(autouse=True)
def _every_priority_for_users(settings: Any) -> None:
    """The queue order over the whole 0-10 range; that only staff may go above
    FINETUNE_USER_MAX_PRIORITY is tested in tests/accounts/test_quotas.py."""
    settings.FINETUNE_USER_MAX_PRIORITY = 10





def test_a_run_completes_with_metrics_contiguous_logs_and_a_checkpoint(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task()
    assert task.status == TaskStatus.QUEUED
    assert "succeeded" in run_task(task.pk)  # the job's result names the run's status
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED and task.exit_code == 0
    assert task.progress == 100.0 and task.current_step == 6 and task.max_steps == 6
    points = list(TaskMetric.objects.filter(task=task, kind="train").order_by("step"))
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(p.loss, float) and isinstance(p.learning_rate, float) for p in points)
    seqs = list(TaskLogLine.objects.filter(task=task).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)) and task.last_log_seq == len(seqs)
    assert Path(task.last_checkpoint).name == "checkpoint-6" and Path(task.last_checkpoint).is_dir()
    assert task.command[0] == str(FAKE_SWIFT) and task.command[1] == "sft"
    assert task.metrics["train_runtime"] > 0
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds[:3] == ["created", "queued", "started"] and kinds[-1] == "completed"
    assert kinds.count("checkpoint") == 2
    texts = list(TaskLogLine.objects.filter(task=task).values_list("text", flat=True))
    assert texts[0].startswith("$ ") and not any("\r" in t for t in texts)
    assert any(t.startswith("[INFO:swift] Saving model checkpoint") for t in texts)
    assert not group_members(task.pid)


def test_the_process_gets_a_clean_argv_and_environment(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = tmp_path / "launch.jsonl"
    fake_swift(record=record)
    monkeypatch.setenv("SOME_WEB_SECRET", "do-not-leak")
    host = announce_host(spec="3x80", cpu=1)
    task = make_task(gpu_config={"devices": "2,0"}, training_args={**ARGS, "system": "Be brief."})
    run_task(task.pk)
    launch = json.loads(record.read_text().splitlines()[0])
    argv = launch["argv"]
    assert argv[:3] == ["sft", "--model", str(Path(task.model_path))]
    for pair in (["--add_version", "false"], ["--check_model", "false"], ["--tuner_type", "lora"],
                 ["--system", "Be brief."], ["--output_dir", task.output_path]):
        i = argv.index(pair[0])
        assert argv[i: i + 2] == pair
    env = launch["env"]
    # The reserved cards by UUID (never guessed indices), in index order; one rendezvous port.
    uuids = dict(host.gpus.values_list("index", "uuid"))
    assert env["CUDA_VISIBLE_DEVICES"] == f"{uuids[0]},{uuids[2]}" and env["NPROC_PER_NODE"] == "2"
    assert env["MASTER_PORT"] == str(task.master_port) == str(settings.FINETUNE_MASTER_PORT_BASE)
    assert env["HF_HUB_OFFLINE"] == "1" and env["USE_HF"] == "1"
    assert env["MPLCONFIGDIR"].startswith(str(Path(task.log_file_path).parent))
    assert launch["cwd"] == str(Path(task.log_file_path).parent)
    built = build_env(task, run=task.run, workdir=Path(task.log_file_path).parent).env
    assert "SOME_WEB_SECRET" not in built and "DATABASE_URL" not in built and "PATH" in built


def test_a_failing_run_ends_failed_with_the_last_error_line(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    fake_swift(fail_at_step=3)
    task = make_task()
    run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.exit_code == 1
    assert "ValueError: fake failure requested at step 3" in task.error_message
    assert task.events.last().kind == "failed"


def test_a_missing_dataset_file_fails_with_a_readable_reason(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], dataset: Dataset
) -> None:
    task = make_task()
    Path(dataset.path).unlink()
    run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert f"The file of dataset {dataset.pk} (colors) is missing" in task.error_message
    assert task.pid is None  # nothing was launched


def test_a_second_delivery_of_the_same_job_launches_nothing(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], tmp_path: Path
) -> None:
    record = tmp_path / "launch.jsonl"
    fake_swift(record=record)
    task = make_task()
    run_task(task.pk)
    assert "not claimed" in run_task(task.pk)
    assert len(record.read_text().splitlines()) == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_of_one_task_let_exactly_one_win(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        barrier.wait()
        try:
            results.append(supervisor.claim(task.run_id) is not None)
        finally:
            from django.db import connection

            connection.close()

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_the_queue_is_configured_never_to_deliver_a_running_job_twice() -> None:
    from django_q.conf import Conf

    q = settings.Q_CLUSTER
    max_runtime = settings.FINETUNE_MAX_RUNTIME_HOURS * 3600
    assert q["orm"] == "default"  # the database broker, which has delivery receipts
    assert q["timeout"] > max_runtime and q["retry"] > q["timeout"]
    assert q["max_attempts"] == 1 and q["ack_failures"] is True
    assert Conf.RETRY == q["retry"] and Conf.MAX_ATTEMPTS == 1 and Conf.ACK_FAILURES is True


def _run_in_thread(task_id: int) -> threading.Thread:
    def target() -> None:
        from django.db import connection

        try:
            run_task(task_id)
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_stopping_a_running_task_kills_its_whole_process_group(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    fake_swift(spawn_child=1, step_seconds=0.2)
    task = make_task(training_args={**ARGS, "max_steps": 500})
    thread = _run_in_thread(task.pk)
    row = wait_for(
        lambda: FinetuningTask.objects.filter(pk=task.pk, run__pid__isnull=False, current_step__gte=2).first()
    )
    assert len(group_members(row.pid)) >= 2  # the wrapper and its trainer child
    services.finetuning_task_stop(task=row)
    thread.join(timeout=30)
    assert not thread.is_alive()
    row.refresh_from_db()
    assert row.status == TaskStatus.STOPPED and row.finished_at is not None
    assert group_members(row.pid) == []
    kinds = list(row.events.values_list("kind", flat=True))
    assert kinds[-1] == "stopped" and kinds.index("stop_requested") < kinds.index("stopped")
    services.finetuning_task_stop(task=row)  # idempotent
    row.refresh_from_db()
    assert row.status == TaskStatus.STOPPED


@pytest.mark.django_db(transaction=True)
def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], settings: Any
) -> None:
    settings.FINETUNE_STOP_GRACE_SECONDS = 1.0
    fake_swift(ignore_sigterm=1, step_seconds=0.2)
    task = make_task(training_args={**ARGS, "max_steps": 500})
    thread = _run_in_thread(task.pk)
    row = wait_for(lambda: FinetuningTask.objects.filter(pk=task.pk, current_step__gte=1).first())
    started = time.monotonic()
    services.finetuning_task_stop(task=row)
    thread.join(timeout=30)
    assert 1.0 <= time.monotonic() - started < 10
    row.refresh_from_db()
    assert row.status == TaskStatus.STOPPED and row.exit_code == -9
    assert group_members(row.pid) == []


@pytest.mark.django_db(transaction=True)
def test_deleting_a_running_task_stops_it_then_removes_logs_but_keeps_the_output(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice: User
) -> None:
    fake_swift(step_seconds=0.1)
    task = make_task(training_args={**ARGS, "max_steps": 500, "save_steps": 2})
    thread = _run_in_thread(task.pk)
    row = wait_for(lambda: FinetuningTask.objects.filter(pk=task.pk, current_step__gte=3).first())
    pid = row.pid  # the run goes with the task
    services.finetuning_task_delete(task=row)
    assert not services.FinetuningTask.objects.visible().filter(pk=task.pk).exists()  # gone from lists at once
    thread.join(timeout=30)
    assert not FinetuningTask.objects.filter(pk=task.pk).exists()
    assert not TaskLogLine.objects.filter(task_id=task.pk).exists()
    assert not Path(row.log_file_path).exists()
    assert any(Path(row.output_path).glob("checkpoint-*"))
    assert not Run.objects.filter(pk=row.run_id).exists()
    assert group_members(pid) == []


def test_a_task_whose_worker_died_is_failed_and_its_process_stopped(db: None) -> None:
    """Worker crash: the runner pid is gone; the swift group it left is killed, the task failed."""
    alice = User.objects.create_user("carol")
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        task = stage_task(
            alice, name="lost", host=settings.FINETUNE_HOST, pid=orphan.pid,
            process_started=psutil.Process(orphan.pid).create_time(), runner_pid=dead.pid,
            heartbeat_at=timezone.now(),
        )
        assert supervisor.reconcile() == [task.run_id]
        task.refresh_from_db()
        assert task.status == TaskStatus.FAILED and "worker supervising this stopped" in task.error_message
        assert orphan.wait(timeout=10) is not None
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_a_recycled_pid_is_never_killed_by_the_reconciler(db: None) -> None:
    alice = User.objects.create_user("dave")
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stage_task(alice, name="lost", host=settings.FINETUNE_HOST, pid=bystander.pid, process_started=12345.0,
                   runner_pid=None)
        supervisor.reconcile()
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()


def test_a_task_on_a_silent_other_host_is_failed_as_lost(db: None) -> None:
    alice = User.objects.create_user("erin")
    stale = timezone.now() - timezone.timedelta(hours=1)
    task = stage_task(alice, name="far", host="gpu-host-9", heartbeat_at=stale)
    fresh = stage_task(alice, name="ok", host="gpu-host-8", heartbeat_at=timezone.now())
    assert supervisor.reconcile() == [task.run_id]
    task.refresh_from_db()
    # A silent host's run is lost (it keeps its reservations); the task fails, saying why.
    assert task.status == TaskStatus.FAILED and task.run.status == RunStatus.LOST
    assert "Host gpu-host-9 stopped reporting" in task.error_message
    fresh.refresh_from_db()
    assert fresh.status == TaskStatus.RUNNING and fresh.run.status == RunStatus.RUNNING


def test_pending_tasks_start_by_priority_then_age(make_task: Callable[..., FinetuningTask]) -> None:
    first = make_task(priority=5)  # takes the only CPU slot
    low, high, mid, high_later = (make_task(priority=p, name=f"p{p}") for p in (1, 9, 5, 9))
    assert first.status == TaskStatus.QUEUED
    order = []
    for _ in range(4):
        (running,) = FinetuningTask.objects.filter(status=TaskStatus.QUEUED)
        assert supervisor.claim(running.run_id)
        services.finetuning_task_finish(task=running, status=TaskStatus.COMPLETED, exit_code=0)
        end_run(running)  # what the supervisor does in the same transaction
        order += [Run.objects.get(pk=run_id).subject_id for run_id in dispatch_pending()]
    assert order == [high.pk, high_later.pk, mid.pk, low.pk]


def test_ten_thousand_log_lines_are_stored_in_order_without_loss(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    fake_swift(lines=10000)
    task = make_task(training_args={**ARGS, "max_steps": 2})
    run_task(task.pk)
    texts = list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("text", flat=True))
    fake = [t for t in texts if t.startswith("fake line ")]
    assert fake == [f"fake line {i}" for i in range(1, 10001)]
    seqs = list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


def test_swift_that_cannot_be_started_fails_the_task_clearly(
    make_task: Callable[..., FinetuningTask], settings: Any
) -> None:
    settings.FINETUNE_SWIFT_BIN = "/nonexistent/swift"
    task = make_task()
    run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and "Could not start swift (/nonexistent/swift)" in task.error_message



"""Fencing and lost hosts (issue 10, "tests that must exist"), with the fake ``swift``:

* a stale supervisor (its run failed, or stopped and resumed, behind its back) stops its process
  group and writes nothing more: no log line, metric, event or status, and it frees nothing;
* a run on a host gone silent is ``lost`` and keeps its reservations; when that host's worker comes
  back its process is reaped and the GPUs freed; staff can release them for a host gone for good;
* a worker killed with SIGKILL mid-run leaves no orphan once it starts again: the run is failed with
  a reason and its slot serves the next task.

Two workers with one host name: tests/tasks/test_worker_host_name.py (real workers) and
tests/gpus/test_host_name.py (the claim itself).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psutil
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.db.models.functions import Now
from django.test import Client
from django.urls import reverse

from gpus.models import Host, Reservation, Run, RunStatus
from gpus.process import group_members, process_matches
from gpus.scheduler import dispatch
from gpus.supervisor import reconcile, runs_release_lost
from tasks import services
from tasks.models import FinetuningTask, TaskEvent, TaskLogLine, TaskMetric, TaskStatus
from tests.conftest import announce_host, wait_for
from tests.runs import run_task, stage_task
from tests.tasks.conftest import ARGS

LONG = {**ARGS, "max_steps": 500, "save_steps": 2}
SILENT = timedelta(minutes=10)


# --- 1. a stale supervisor writes nothing and frees nothing ------------------------------------------
def _supervise_in_thread(task_id: int) -> tuple[threading.Thread, dict[str, str]]:
    result: dict[str, str] = {}

    def target() -> None:
        try:
            result["outcome"] = run_task(task_id)
        finally:
            connection.close()

    thread = threading.Thread(target=target, name=f"supervisor-{task_id}", daemon=True)
    thread.start()
    return thread, result


def _snapshot(task_id: int) -> dict[str, Any]:
    """Everything a supervisor of the task could write."""
    task = FinetuningTask.objects.get(pk=task_id)
    runs = {run.pk: (run.status, run.error, run.exit_code, run.finished_at, run.heartbeat_at, run.pid)
            for run in Run.objects.filter(kind="train", subject_id=task_id)}
    return {
        "task": {field.attname: getattr(task, field.attname) for field in FinetuningTask._meta.concrete_fields},
        "runs": runs,
        "lines": TaskLogLine.objects.filter(task_id=task_id).count(),
        "metrics": TaskMetric.objects.filter(task_id=task_id).count(),
        "events": list(TaskEvent.objects.filter(task_id=task_id).values_list("pk", flat=True)),
        "reservations": sorted(Reservation.objects.values_list("pk", "run_id")),
    }


def _running(task_id: int, *, step: int) -> FinetuningTask | None:
    row = FinetuningTask.objects.filter(pk=task_id, status=TaskStatus.RUNNING, current_step__gte=step,
                                        run__pid__isnull=False).first()
    return row if row is not None and row.last_checkpoint else None


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("cpu_host")
@pytest.mark.timeout(120)
def test_a_supervisor_whose_run_was_failed_behind_its_back_stops_its_group_and_writes_nothing(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    fake_swift(step_seconds=0.1, spawn_child=1)
    task = make_task(training_args=LONG)
    thread, result = _supervise_in_thread(task.pk)
    row = wait_for(lambda: _running(task.pk, step=3), timeout=60)
    pid, run_id = row.pid, row.run_id
    assert len(group_members(pid)) >= 2  # the wrapper and its trainer child
    reserved = list(Reservation.objects.filter(run_id=run_id).values_list("pk", flat=True))
    assert reserved

    assert Run.objects.filter(pk=run_id).update(status=RunStatus.FAILED)  # e.g. a reconciler gave up on it
    before = _snapshot(task.pk)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the stale supervisor did not return"
    assert group_members(pid) == []
    assert _snapshot(task.pk) == before  # no line, metric, event, task field or run field written
    assert list(Reservation.objects.filter(run_id=run_id).values_list("pk", flat=True)) == reserved  # nothing freed
    run = Run.objects.get(pk=run_id)
    assert run.status == RunStatus.FAILED and run.error == "" and run.finished_at is None
    assert "failed" in result["outcome"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("cpu_host")
@pytest.mark.timeout(120)
def test_a_supervisor_whose_task_was_stopped_and_resumed_leaves_the_new_run_alone(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask]
) -> None:
    fake_swift(step_seconds=0.1, spawn_child=1)
    task = make_task(training_args=LONG)
    thread, _ = _supervise_in_thread(task.pk)
    row = wait_for(lambda: _running(task.pk, step=3), timeout=60)
    pid, old_run_id = row.pid, row.run_id

    # Behind its back (a partition: another host's reconciler or an operator ended it): the run is
    # stopped and its slot freed, the task stopped, then resumed: a new run books the slot.
    Run.objects.filter(pk=old_run_id).update(status=RunStatus.STOPPED, finished_at=Now())
    Reservation.objects.filter(run_id=old_run_id).delete()
    FinetuningTask.objects.filter(pk=task.pk).update(status=TaskStatus.STOPPED)
    resumed = services.finetuning_task_resume(task=FinetuningTask.objects.get(pk=task.pk))
    dispatch()
    resumed.refresh_from_db()
    new_run = Run.objects.get(pk=resumed.run_id)
    assert new_run.pk != old_run_id and new_run.status == RunStatus.QUEUED
    assert resumed.status == TaskStatus.QUEUED
    new_reservations = list(Reservation.objects.filter(run_id=new_run.pk).values_list("pk", flat=True))
    assert new_reservations
    before = _snapshot(task.pk)

    thread.join(timeout=30)
    assert not thread.is_alive(), "the stale supervisor did not return"
    assert group_members(pid) == []
    assert _snapshot(task.pk) == before  # the task, both runs, lines, metrics and events untouched
    assert list(Reservation.objects.filter(run_id=new_run.pk).values_list("pk", flat=True)) == new_reservations
    assert Run.objects.get(pk=new_run.pk).status == RunStatus.QUEUED
    assert FinetuningTask.objects.get(pk=task.pk).status == TaskStatus.QUEUED


# --- 2. a silent host's run is lost, keeps its GPUs, and is reaped when its worker is back ------------


def _silent_host(name: str) -> Host:
    host = announce_host(name, "1x80")
    Host.objects.filter(pk=host.pk).update(last_seen_at=Now() - SILENT)  # the database's clock
    return host


def _running_on(owner: User, host: Host, name: str, **run_fields: Any) -> FinetuningTask:
    """A task running on ``host`` with its GPU booked, its supervisor silent for 10 minutes."""
    task = stage_task(owner, name=name, host=host.name, runner_instance=f"supervisor-{name}", **run_fields)
    Run.objects.filter(pk=task.run_id).update(heartbeat_at=Now() - SILENT)
    Reservation.objects.create(host=host, gpu=host.gpus.get(), run_id=task.run_id)
    return task


def test_a_run_on_a_silent_host_is_lost_keeps_its_gpu_and_is_reaped_when_that_hosts_worker_is_back(
    alice: User, cpu_host: Host, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    far = _silent_host("gpu-host-9")
    swift = sleeper()  # its process, still on the GPU
    dead = subprocess.Popen(["true"])
    dead.wait()  # the supervisor of the crashed worker
    task = _running_on(alice, far, "far", pid=swift.pid, process_started=psutil.Process(swift.pid).create_time(),
                       runner_pid=dead.pid)

    assert reconcile() == [task.run_id]  # as this host
    task.refresh_from_db()
    assert task.run.status == RunStatus.LOST
    assert Reservation.objects.filter(run_id=task.run_id, gpu__host=far).count() == 1  # kept: it may be in use
    assert task.status == TaskStatus.FAILED and "gpu-host-9" in task.error_message
    assert "gpu-host-9" in TaskEvent.objects.filter(task=task).last().message
    assert swift.poll() is None  # another host's process is not this host's to touch
    assert reconcile() == []  # found lost once

    # That host's worker restarts: it reaps the lost run's process (pid and start time) and frees the GPU.
    assert reconcile(host="gpu-host-9") == [task.run_id]
    assert swift.wait(timeout=10) is not None
    task.refresh_from_db()
    assert task.run.status == RunStatus.FAILED and "came back" in task.run.error
    assert not Reservation.objects.filter(run_id=task.run_id).exists()
    assert not Reservation.objects.filter(gpu__host=far).exists()  # the GPU is free
    assert task.status == TaskStatus.FAILED


def test_staff_release_the_gpus_of_a_host_gone_for_good(alice: User, staff: User) -> None:
    gone = _silent_host("gpu-host-7")
    task = _running_on(alice, gone, "gone")
    assert reconcile() == [task.run_id]
    assert Reservation.objects.filter(run_id=task.run_id).exists()
    assert runs_release_lost(host=gone) == 1
    run = Run.objects.get(pk=task.run_id)
    assert run.status == RunStatus.FAILED and "An operator released its GPUs" in run.error
    assert not Reservation.objects.filter(gpu__host=gone).exists()
    assert runs_release_lost(host=gone) == 0  # nothing left to release

    # The same from the admin's action on the Host list.
    again = _running_on(alice, gone, "gone-again")
    assert reconcile() == [again.run_id]
    client = Client()
    client.force_login(staff)
    response = client.post(reverse("admin:gpus_host_changelist"),
                           {"action": "release_lost", "_selected_action": [gone.pk]}, follow=True)
    assert response.status_code == 200
    assert "Released 1 lost run(s)" in response.content.decode()
    assert Run.objects.get(pk=again.run_id).status == RunStatus.FAILED
    assert not Reservation.objects.filter(gpu__host=gone).exists()


# --- 4. SIGKILL of the worker mid-run ----------------------------------------------------------------
def _crash(worker_proc: subprocess.Popen[bytes], swift_pid: int) -> None:
    """SIGKILL the worker and every process it started except the swift group (a crash, an OOM kill
    of the worker's processes): the swift group is orphaned, still running."""
    swift_session = os.getsid(swift_pid)
    procs = [psutil.Process(worker_proc.pid), *psutil.Process(worker_proc.pid).children(recursive=True)]
    killed = []
    for proc in procs:
        try:
            if os.getsid(proc.pid) != swift_session:
                proc.kill()
                killed.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    worker_proc.wait(timeout=10)
    psutil.wait_procs(killed, timeout=10)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_a_worker_killed_mid_run_leaves_no_orphan_and_its_slot_serves_the_next_task(
    worker: Callable[..., subprocess.Popen[bytes]], make_task: Callable[..., FinetuningTask],
    fake_swift: Callable[..., None],
) -> None:
    fake_swift(step_seconds=0.5, spawn_child=1)
    first = worker(FINETUNE_CPU_SLOTS="1")
    announce_host(cpu=1)
    task = make_task(training_args={**ARGS, "max_steps": 2000, "save_steps": 1000}, gpu_config={})
    row = wait_for(lambda: FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.RUNNING,
                                                         run__pid__isnull=False, current_step__gte=1).first(),
                   timeout=90)
    swift_pid, swift_started, run_id = row.pid, row.process_started, row.run_id
    group = group_members(swift_pid)
    assert len(group) >= 2  # the wrapper and its trainer child
    assert Reservation.objects.filter(run_id=run_id).count() == 1

    _crash(first, swift_pid)
    assert process_matches(swift_pid, swift_started), "the crash must leave the swift group behind"
    assert FinetuningTask.objects.get(pk=task.pk).status == TaskStatus.RUNNING  # nobody said anything yet

    fake_swift(step_seconds=0.01)
    worker(FINETUNE_CPU_SLOTS="1")  # the restart reaps what the crashed worker left
    wait_for(lambda: Run.objects.get(pk=run_id).status == RunStatus.FAILED, timeout=60)
    wait_for(lambda: not group_members(swift_pid), timeout=30)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    row = FinetuningTask.objects.get(pk=task.pk)
    assert row.status == TaskStatus.FAILED
    assert "The worker supervising this stopped (worker crash or restart)" in row.error_message
    assert not Reservation.objects.filter(run_id=run_id).exists()

    later = make_task(name="later", gpu_config={})  # takes the freed CPU slot and runs on the new worker
    wait_for(lambda: FinetuningTask.objects.get(pk=later.pk).status == TaskStatus.COMPLETED, timeout=90)
    assert Run.objects.get(pk=FinetuningTask.objects.get(pk=later.pk).run_id).host == settings.FINETUNE_HOST

"""Stopping a worker (``manage.py worker``) while a task runs: any number of SIGTERM/SIGINT, to its
main process or to its whole process group, ends it within seconds, stops the swift group it started
(wrapper and child), and the task says why in plain words. django-q2's own signal handler deadlocked
on the second signal; a signal to the group used to orphan swift."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from gpus.models import Reservation
from gpus.process import process_matches
from gpus.scheduler import dispatch as dispatch_pending
from tasks.models import EventKind, FinetuningTask, TaskEvent, TaskStatus
from tests.conftest import announce_host, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


def running_with_child(task_id: int) -> FinetuningTask | None:
    """The task once its fake swift wrapper runs and has started its 'trainer' child."""
    row = FinetuningTask.objects.get(pk=task_id)
    if row.status != TaskStatus.RUNNING or not process_matches(row.pid, row.process_started):
        return None
    return row if psutil.Process(row.pid).children() else None


def tree(root_pid: int, swift_pid: int) -> list[psutil.Process]:
    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    procs += [psutil.Process(swift_pid), *psutil.Process(swift_pid).children(recursive=True)]
    return procs


def signal_many(proc: subprocess.Popen[bytes], how: str) -> None:
    if how == "main":
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            proc.send_signal(sig)
            time.sleep(0.05)
    else:  # the whole group, as a terminal's Ctrl-C or systemd's stop does, then the main process again
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("how", ["main", "group"])
def test_any_number_of_signals_stop_the_worker_and_its_swift_group_cleanly(
    how: str, worker: Callable[..., subprocess.Popen[bytes]], make_task: Callable[..., FinetuningTask],
    fake_swift: Callable[..., None],
) -> None:
    fake_swift(step_seconds=0.5, spawn_child=1)  # a long run, wrapper + child like the real swift
    proc = worker(FINETUNE_CPU_SLOTS="1")
    announce_host(cpu=1)
    task = make_task(training_args={"max_steps": 2000, "logging_steps": 1, "save_steps": 1000,
                                    "model_type": "qwen2", "template": "qwen2_5"}, gpu_config={})
    row = wait_for(lambda: running_with_child(task.pk), timeout=60)
    procs = tree(proc.pid, row.pid)

    started = time.monotonic()
    signal_many(proc, how)
    proc.wait(timeout=40)
    took = time.monotonic() - started

    left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still alive after the worker stopped: {[(p.pid, p.cmdline()) for p in left]}"
    assert took < 20, f"the worker took {took:.1f} s to stop"
    row.refresh_from_db()
    assert row.status == TaskStatus.FAILED
    assert "was shut down (Ctrl-C or SIGTERM) while this task ran" in row.error_message
    assert "Resume from the last checkpoint" in row.error_message
    assert not Reservation.objects.filter(run_id=row.run_id).exists()


def test_a_task_the_stopping_worker_never_started_goes_back_to_the_queue(
    db: None, make_task: Callable[..., FinetuningTask], cpu_host: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpus import process
    from tests.runs import run_task

    task = make_task()
    assert task.status == TaskStatus.QUEUED
    monkeypatch.setattr(process, "_shutdown_signalled", True)
    outcome = run_task(task.pk)

    task.refresh_from_db()
    assert "back in the queue" in outcome
    assert task.status == TaskStatus.PENDING and task.host == "" and task.pid is None
    assert not Reservation.objects.filter(run_id=task.run_id).exists()
    event = TaskEvent.objects.filter(task=task, kind=EventKind.REQUEUED).get()
    assert "shut down before it started this; back in the queue" in event.message
    monkeypatch.setattr(process, "_shutdown_signalled", False)
    dispatch_pending()
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED  # placed again: the next worker start runs it

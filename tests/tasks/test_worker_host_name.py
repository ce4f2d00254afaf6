"""Two real ``manage.py worker`` processes with one ``FINETUNE_HOST`` (cloned VMs, identical container
host names): the second refuses to start, before its GPU agent or its reconcile touch anything, and
the first keeps running its tasks; after a clean stop the name is free for a restart (M6)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings

from gpus.models import Host
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import stop_server, wait_for
from tests.tasks.conftest import ARGS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


def status(task: FinetuningTask) -> str:
    return FinetuningTask.objects.values_list("status", flat=True).get(pk=task.pk)


def held_by(proc: subprocess.Popen[bytes]) -> bool:
    """The host name is held by this worker and its agent has announced the host's CPU slot."""
    return Host.objects.live().filter(name=settings.FINETUNE_HOST, agent_pid=proc.pid, cpu_slots=1).exists()


def test_a_second_worker_with_a_live_host_name_refuses_to_start_and_a_restart_after_a_clean_stop_works(
    worker: Callable[..., subprocess.Popen[bytes]], make_task: Callable[..., FinetuningTask],
    fake_swift: Callable[..., None], tmp_path: Path,
) -> None:
    fake_swift(step_seconds=0.5)
    first = worker(FINETUNE_CPU_SLOTS="1")
    wait_for(lambda: held_by(first), timeout=60)
    task = make_task(training_args={**ARGS, "max_steps": 24, "save_steps": 100})
    wait_for(lambda: status(task) == TaskStatus.RUNNING, timeout=60)

    started = time.monotonic()
    second = worker(FINETUNE_CPU_SLOTS="1")
    code = second.wait(timeout=60)
    took = time.monotonic() - started
    output = (tmp_path / "worker-1.log").read_text()
    assert code != 0, output
    assert (f"Host name {settings.FINETUNE_HOST!r} is already in use by a live worker (pid {first.pid} on "
            f"{socket.gethostname()}, last seen ") in output
    assert "Set FINETUNE_HOST to a unique name for this host, or stop the other worker." in output
    assert "Worker for host" not in output  # it never reached its cluster
    assert took < 30, f"the refusal took {took:.1f} s"

    # The first worker never noticed: its task runs to the end, its name is still its own.
    assert first.poll() is None and status(task) == TaskStatus.RUNNING
    wait_for(lambda: status(task) == TaskStatus.COMPLETED, timeout=90)
    assert Host.objects.get(name=settings.FINETUNE_HOST).agent_pid == first.pid

    # A clean stop gives the name back at once (no waiting for the host to go stale) ...
    stop_server(first, timeout=30)
    assert Host.objects.get(name=settings.FINETUNE_HOST).agent_instance == ""
    # ... so a restart of the same host is accepted and runs tasks.
    third = worker(FINETUNE_CPU_SLOTS="1")
    wait_for(lambda: held_by(third), timeout=60)
    again = make_task(name="after restart")
    wait_for(lambda: status(again) == TaskStatus.COMPLETED, timeout=90)
    assert third.poll() is None

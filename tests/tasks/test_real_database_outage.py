"""Real outages during real runs: API → queue → a real worker → the real ``swift`` on the tiny model,
while the database goes away under the runner (security review H3):

* PostgreSQL: the runner's connection is killed with ``pg_terminate_backend``, twice;
* SQLite: another connection holds the write lock for 60 s (twice the busy timeout of
  finetune_platform/settings.py, so the runner's writes fail with ``database is locked``).

Each run completes, and what the database holds is exactly what swift wrote: every line of its log
once, in order, with contiguous sequence numbers, and one metric point per logged step.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.db import connection
from rest_framework.test import APIClient

from core.swift_cli.output import LogSplitter
from tasks.models import FinetuningTask, TaskLogLine, TaskMetric, TaskStatus
from tests.conftest import upload, wait_for
from tests.tasks.test_real_swift import REAL_ARGS, create

pytestmark = [pytest.mark.real_swift, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.STOPPED)


def start(alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path], max_steps: int) -> int:
    sft = upload(alice_api, data_files["sft_messages"])
    created = create(alice_api, name="outage", base_model=str(tiny_model), datasets=[sft["id"]],
                     training_args={**REAL_ARGS, "max_steps": max_steps, "save_steps": max_steps})
    return int(created["id"])


def at_step(task_id: int, step: int, timeout: float = 300) -> FinetuningTask:
    """The row once the run has logged ``step`` (read with the ORM: it only reads)."""
    return wait_for(lambda: FinetuningTask.objects.filter(pk=task_id, current_step__gte=step).first(),
                    timeout=timeout, interval=0.1)


def finished(task_id: int, timeout: float) -> FinetuningTask:
    return wait_for(lambda: FinetuningTask.objects.filter(pk=task_id, status__in=TERMINAL).first(),
                    timeout=timeout, interval=0.5)


def assert_whole(task: FinetuningTask, max_steps: int) -> None:
    """Completed, and the database holds exactly what swift wrote: each line of its log once, in
    order, numbered 1..N, and one metric point per logged step."""
    assert task.status == TaskStatus.COMPLETED and task.exit_code == 0, task.error_message
    rows = list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("seq", "text"))
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1)) and task.last_log_seq == len(rows)
    splitter = LogSplitter()
    written = splitter.feed(Path(task.log_file_path).read_bytes()) + splitter.flush()
    assert [text for _, text in rows] == written  # nothing lost, nothing twice
    steps = list(TaskMetric.objects.filter(task=task, kind="train").order_by("step").values_list("step", flat=True))
    assert steps == list(range(1, max_steps + 1))
    assert task.current_step == max_steps and task.progress == 100
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds.count("started") == 1 and kinds[-1] == "completed" and kinds.count("completed") == 1


def worker_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.log")))


def backends_of(pid: int) -> list[int]:
    """The PostgreSQL backend pids serving the connections of process ``pid``."""
    ports = [c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
             if c.raddr and c.raddr.port == int(connection.settings_dict.get("PORT") or 5432)]
    if not ports:
        return []
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", [ports])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.skipif(connection.vendor != "postgresql",
                    reason="pg_terminate_backend needs PostgreSQL (set DATABASE_URL); SQLite's outage is the lock test")
def test_a_real_run_survives_its_database_connection_being_killed(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    max_steps = 40
    worker()
    task_id = start(alice_api, tiny_model, data_files, max_steps)
    for step in (3, 15):
        row = at_step(task_id, step)
        assert row.status == TaskStatus.RUNNING and psutil.pid_exists(row.pid), "swift ended too soon"
        killed = backends_of(row.runner_pid)
        assert killed, "the runner holds no database connection"
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [killed])
    task = finished(task_id, timeout=300)
    log = worker_log(tmp_path)
    assert "the run goes on, retrying" in log, log[-3000:]
    assert_whole(task, max_steps)


@pytest.mark.skipif(connection.vendor != "sqlite",
                    reason="holds SQLite's write lock; PostgreSQL's outage is the pg_terminate_backend test")
def test_a_real_run_survives_sqlite_locked_for_a_minute(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path], tmp_path: Path
) -> None:
    max_steps = 60
    # The production default: a minute of silence is no reason for the sweep to think the runner dead.
    worker(FINETUNE_LOST_AFTER_SECONDS="120")
    task_id = start(alice_api, tiny_model, data_files, max_steps)
    row = at_step(task_id, 3)
    log_file = Path(row.log_file_path)
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock: every other writer waits, then fails
        locked_at, size_at_lock = time.monotonic(), log_file.stat().st_size
        grew = threading.Event()
        while time.monotonic() - locked_at < 60:
            time.sleep(0.5)
            if log_file.stat().st_size > size_at_lock + 1000:
                grew.set()  # swift goes on training and writing meanwhile
        locked_row = FinetuningTask.objects.get(pk=task_id)  # reads still work (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert grew.is_set()
    assert locked_row.last_log_seq < sum(1 for _ in LogSplitter().feed(log_file.read_bytes()))
    task = finished(task_id, timeout=300)
    log = worker_log(tmp_path)
    assert "database is locked" in log and "the run goes on, retrying" in log, log[-3000:]
    assert_whole(task, max_steps)

"""Which pending task starts next, and handing it to a worker.

Until the GPU scheduler lands (issue #3) the rule is simple: at most ``FINETUNE_SLOTS`` tasks are
queued or running at once, and free slots go to pending tasks in queue order (larger priority
first, then the oldest). Dispatch runs on events (a task was created, a task ended, a slot was
freed) and from the periodic sweep as a safety net.

Dispatch is serialised: on PostgreSQL by a transaction-scoped advisory lock, on SQLite by the
IMMEDIATE transaction mode set in settings. The worker job is enqueued inside the same
transaction (the django-q2 ORM broker writes an ``OrmQ`` row), so a rolled-back dispatch enqueues
nothing and a committed one cannot lose its job.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from django_q.tasks import async_task

from tasks.models import EventKind, FinetuningTask, TaskStatus
from tasks.publisher import publish_event

logger = logging.getLogger(__name__)

_DISPATCH_LOCK = 0x46_54_50_01  # "FTP" 1: any constant shared by every process


def _lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_DISPATCH_LOCK])


def enqueue_run(task_id: int) -> None:
    """Hand a queued task to a django-q2 worker (runner.run_task claims it atomically)."""
    async_task("tasks.jobs.run_task", task_id, task_name=f"run-task-{task_id}", ack_failure=True)


def dispatch_pending() -> list[int]:
    """Move as many pending tasks to ``queued`` as there are free slots; returns their ids."""
    queued: list[int] = []
    with transaction.atomic():
        _lock()
        busy = FinetuningTask.objects.filter(status__in=[TaskStatus.QUEUED, TaskStatus.RUNNING]).count()
        free = settings.FINETUNE_SLOTS - busy
        if free <= 0:
            return []
        candidates = (
            FinetuningTask.objects.filter(
                status=TaskStatus.PENDING, stop_requested_at__isnull=True, delete_requested_at__isnull=True
            )
            .queue_order()
            .only("pk")[:free]
        )
        now = timezone.now()
        for task in list(candidates):
            moved = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING).update(
                status=TaskStatus.QUEUED, queued_at=now
            )
            if moved:
                enqueue_run(task.pk)
                queued.append(task.pk)
    for task in FinetuningTask.objects.filter(pk__in=queued):
        publish_event(task, EventKind.QUEUED, "Handed to a worker")
    return queued


def dispatch_on_commit() -> None:
    """Dispatch once the current transaction commits (or now, outside one)."""
    transaction.on_commit(_safe_dispatch)


def _safe_dispatch() -> None:
    try:
        dispatch_pending()
    except Exception:  # noqa: BLE001 - the periodic sweep retries; never fail the caller's request
        logger.exception("dispatch failed; the periodic sweep will retry")

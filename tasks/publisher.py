"""The one progress publisher: every line, metric, progress change and event of a run goes here.

It batches log lines, gives them increasing per-task sequence numbers, writes them with the task
row's progress fields in one transaction, then broadcasts what changed to the task's group and its
owner's group. The database is the truth; a broadcast that is lost (the channel layer drops
messages silently) is repaired by the page's backfill from ``after=<seq>``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks.models import FinetuningTask, TaskEvent, TaskLogLine, TaskMetric
from tasks.swift_output import MetricPoint

logger = logging.getLogger(__name__)

#: Fields of the task row that the publisher keeps current (and broadcasts).
PROGRESS_FIELDS = (
    "status", "progress", "current_step", "max_steps", "epoch", "loss", "learning_rate",
    "eta_seconds", "last_checkpoint", "last_log_seq",
)


MAX_BROADCAST_LINES = 500


def task_group(task_id: int) -> str:
    return f"task.{int(task_id)}"


def user_group(user_id: int) -> str:
    return f"user.{int(user_id)}"


def broadcast(task: FinetuningTask, payload: dict[str, Any]) -> None:
    """Send to the task's and owner's groups. Never raises: the page backfills from the database."""
    if "InMemoryChannelLayer" in settings.CHANNEL_LAYERS["default"]["BACKEND"]:
        return  # no cross-process layer: pages follow the database instead
    try:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        message = {"type": "task.update", "task": task.pk, **payload}
        async_to_sync(layer.group_send)(task_group(task.pk), message)
        summary = {k: v for k, v in message.items() if k not in ("lines", "metrics")}
        async_to_sync(layer.group_send)(user_group(task.owner_id), summary)
    except Exception:  # noqa: BLE001 - a broadcast failure must never break a training run
        logger.warning("broadcast for task %s failed", task.pk, exc_info=True)


def _iso(moment: datetime) -> str:
    return moment.isoformat()


class ProgressPublisher:
    """Collects a run's output and flushes it to the database at most every ``interval`` seconds."""

    def __init__(self, task: FinetuningTask, *, interval: float = 0.15) -> None:
        self.task = task
        self.interval = interval
        self._lines: list[tuple[str, datetime]] = []
        self._metrics: dict[tuple[str, int], MetricPoint] = {}
        self._dirty: set[str] = set()
        self._last_flush = 0.0

    # --- collecting ---------------------------------------------------------------------------
    def add_lines(self, lines: list[str]) -> None:
        now = timezone.now()
        self._lines.extend((line, now) for line in lines)

    def add_metric(self, point: MetricPoint) -> None:
        self._metrics[(point.kind, point.step)] = point
        task = self.task
        if point.kind == "train":
            task.current_step = max(task.current_step, point.step)
            if point.max_steps:
                task.max_steps = point.max_steps
            if point.loss is not None:
                task.loss = point.loss
            if point.learning_rate is not None:
                task.learning_rate = point.learning_rate
            if point.epoch is not None:
                task.epoch = point.epoch
            if point.remaining_seconds is not None:
                task.eta_seconds = point.remaining_seconds
            if task.max_steps:
                task.progress = round(min(100.0, 100.0 * task.current_step / task.max_steps), 2)
            self._dirty.update(PROGRESS_FIELDS)

    def set(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.task, name, value)
            self._dirty.add(name)

    # --- writing ------------------------------------------------------------------------------
    def flush(self, *, force: bool = False) -> None:
        if not (self._lines or self._metrics or self._dirty):
            return
        if not force and time.monotonic() - self._last_flush < self.interval:
            return
        self._last_flush = time.monotonic()
        task = self.task
        lines, self._lines = self._lines, []
        points, self._metrics = list(self._metrics.values()), {}
        dirty, self._dirty = self._dirty, set()
        first_seq = task.last_log_seq + 1
        rows = [
            TaskLogLine(task=task, seq=first_seq + i, text=text, created_at=at) for i, (text, at) in enumerate(lines)
        ]
        if rows:
            task.last_log_seq = rows[-1].seq
            dirty.add("last_log_seq")
        with transaction.atomic():
            if rows:
                TaskLogLine.objects.bulk_create(rows)
            if points:
                TaskMetric.objects.bulk_create(
                    [self._metric_row(p) for p in points],
                    update_conflicts=True,
                    unique_fields=["task", "kind", "step"],
                    update_fields=["epoch", "loss", "learning_rate", "grad_norm", "token_acc",
                                   "memory_gib", "seconds_per_step", "values"],
                )
            if dirty:
                FinetuningTask.objects.filter(pk=task.pk).update(**{f: getattr(task, f) for f in dirty})
        payload: dict[str, Any] = {f: getattr(task, f) for f in PROGRESS_FIELDS}
        if rows:
            # A burst is not broadcast whole (a message of megabytes times out in the layer); the
            # consumer reads the lines it was not sent from the database, by sequence number.
            payload["lines"] = [{"seq": r.seq, "text": r.text, "time": _iso(r.created_at)}
                                for r in rows[:MAX_BROADCAST_LINES]]
        if points:
            payload["metrics"] = [self._metric_payload(p) for p in points]
        broadcast(task, payload)

    def event(self, kind: str, message: str = "", **data: Any) -> TaskEvent:
        """Record a lifecycle event now (events are rare; they are not batched)."""
        self.flush(force=True)
        return publish_event(self.task, kind, message, **data)

    def _metric_row(self, p: MetricPoint) -> TaskMetric:
        return TaskMetric(
            task=self.task, kind=p.kind, step=p.step, epoch=p.epoch, loss=p.loss, learning_rate=p.learning_rate,
            grad_norm=p.grad_norm, token_acc=p.token_acc, memory_gib=p.memory_gib,
            seconds_per_step=p.seconds_per_step, values=p.values,
        )

    @staticmethod
    def _metric_payload(p: MetricPoint) -> dict[str, Any]:
        return {"kind": p.kind, "step": p.step, "epoch": p.epoch, "loss": p.loss,
                "learning_rate": p.learning_rate, "grad_norm": p.grad_norm, "token_acc": p.token_acc}


def publish_event(task: FinetuningTask, kind: str, message: str = "", **data: Any) -> TaskEvent:
    """Record a lifecycle event and broadcast it with the task's current progress fields."""
    event = TaskEvent.objects.create(task=task, kind=kind, message=message, data=data)
    broadcast(task, {"event": {"kind": kind, "message": message, "time": _iso(event.created_at)},
                     **{f: getattr(task, f) for f in PROGRESS_FIELDS}})
    return event

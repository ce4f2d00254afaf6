"""The one progress publisher: every line, metric, progress change and event of a run goes here.

It batches log lines, gives them increasing per-task sequence numbers, writes them with the task
row's progress fields (and its heartbeat, by the database's clock) in one transaction, then
broadcasts what changed to the task's group and its owner's group. The database is the truth; a
broadcast that is lost (the channel layer drops messages silently) is repaired by the page's
backfill from ``after=<seq>``.

**The database may go away** (a PostgreSQL restart, a killed connection, SQLite locked longer than
its busy timeout) for minutes while swift trains on. A failed write never raises: everything stays
buffered (lines, metrics, dirty fields, events, in order), the connection is dropped so that the
next try reconnects, and the next try waits for :class:`Backoff` (0.5 s doubling to 5 s). Lines get
their sequence numbers only when a write commits, so they stay contiguous. If the connection broke
while a COMMIT was being answered, the next try first looks for that write's last line (or event)
to learn whether it committed after all, and drops what it wrote, so nothing is written twice.

The buffer is bounded (:attr:`ProgressPublisher.full`): when it is full the runner stops reading
swift's log file, which holds every line anyway, and reads on once the database is back. Memory
stays bounded and no line is ever dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import DatabaseError, transaction
from django.utils import timezone

from core.live.publish import publish_many
from core.swift_cli.output import MetricPoint, json_safe
from gpus.outage import Backoff, database_failed
from gpus.workloads import Fenced
from tasks.models import FinetuningTask, TaskEvent, TaskLogLine, TaskMetric

logger = logging.getLogger(__name__)

#: Fields of the task row that the publisher keeps current (and broadcasts).
PROGRESS_FIELDS = (
    "status", "progress", "current_step", "max_steps", "epoch", "loss", "learning_rate",
    "eta_seconds", "last_checkpoint", "last_log_seq",
)

#: Where the task's ``metrics`` JSON keeps the kind (``"nan"``, ``"inf"``, ``"-inf"``) of a value
#: stored as null because swift reported it non-finite: the live ``loss``/``learning_rate``/``epoch``
#: columns and the summary's keys (``train_loss``). A metric point keeps its own map under the same
#: key in its ``values``. Pages show "NaN" / "∞" from it.
NONFINITE_KEY = "nonfinite"
#: Task columns that follow the latest training point (a non-finite one sets them to null).
_LIVE_FIELDS = ("loss", "learning_rate", "epoch")

MAX_BROADCAST_LINES = 500
#: Log lines per write transaction (a backlog after an outage is written in several).
WRITE_BATCH_LINES = 5000
#: The buffer is full at this many characters of log text (plus ``_LINE_OVERHEAD`` per line) or
#: this many metric points; the runner then stops reading swift's output until it drains.
MAX_BUFFERED_CHARS = 16 << 20
MAX_BUFFERED_POINTS = 20_000
_LINE_OVERHEAD = 100

def task_group(task_id: int) -> str:
    return f"task.{int(task_id)}"


#: Where a summary of every task's changes goes (the task lists, the queue).
TASKS_GROUP = "tasks"


def broadcast(task: FinetuningTask, payload: dict[str, Any]) -> None:
    """Announce a change of the task: everything to the task's group, a summary (no lines, no
    metrics) to :data:`TASKS_GROUP` (task lists, the queue). Never raises: the pages repair a lost
    notice from the database (``core.live``)."""
    message = {"task": task.pk, **json_safe(payload)}
    summary = {k: v for k, v in message.items() if k not in ("lines", "metrics")}
    summary["owner"] = task.owner_id
    publish_many([(task_group(task.pk), message), (TASKS_GROUP, summary)])


def _iso(moment: datetime) -> str:
    return moment.isoformat()


# --- the publisher -----------------------------------------------------------------------------------
@dataclass
class _Event:
    kind: str
    message: str
    data: dict[str, Any]
    at: datetime


@dataclass
class _Attempt:
    """A write whose transaction failed: whether it committed is read back from its last line or,
    without lines, its first event (metrics and fields are idempotent: writing them twice is fine)."""

    lines: int
    last_seq: int
    events: int
    first_event: _Event | None


@dataclass
class _Written:
    rows: list[TaskLogLine] = field(default_factory=list)
    points: list[MetricPoint] = field(default_factory=list)
    events: list[TaskEvent] = field(default_factory=list)


class ProgressPublisher:
    """Collects a run's output and flushes it to the database at most every ``interval`` seconds."""

    def __init__(self, task: FinetuningTask, *, interval: float = 0.15, backoff: Backoff | None = None,
                 guard: Callable[[], bool] | None = None) -> None:
        self.task = task
        #: Called first in every write's transaction: False means the run is not the writer's any more
        #: (fencing; it also stamps the run's heartbeat). The write is rolled back and nothing more is
        #: written: :attr:`fenced` turns True.
        self.guard = guard
        self.fenced = False
        self.interval = interval
        self.backoff = backoff or Backoff()
        self._lines: list[tuple[str, datetime]] = []
        self._chars = 0
        self._metrics: dict[tuple[str, int], MetricPoint] = {}
        self._dirty: set[str] = set()
        self._events: list[_Event] = []
        self._unconfirmed: _Attempt | None = None
        self._last_flush = 0.0

    # --- collecting ---------------------------------------------------------------------------
    def add_lines(self, lines: list[str]) -> None:
        now = timezone.now()
        self._lines.extend((line, now) for line in lines)
        self._chars += sum(len(line) + _LINE_OVERHEAD for line in lines)

    def add_metric(self, point: MetricPoint) -> None:
        self._metrics[(point.kind, point.step)] = point
        task = self.task
        if point.kind == "train":
            task.current_step = max(task.current_step, point.step)
            if point.max_steps:
                task.max_steps = point.max_steps
            marks: dict[str, str | None] = {}
            for name in _LIVE_FIELDS:
                value, kind = getattr(point, name), point.nonfinite.get(name)
                if value is not None or kind is not None:
                    setattr(task, name, value)  # null for NaN/inf: the kind goes to the task's metrics
                    marks[name] = kind
            self._mark_nonfinite(marks)
            if point.remaining_seconds is not None:
                task.eta_seconds = point.remaining_seconds
            if task.max_steps:
                task.progress = round(min(100.0, 100.0 * task.current_step / task.max_steps), 2)
            self._dirty.update(PROGRESS_FIELDS)

    def add_summary(self, summary: dict[str, Any], nonfinite: dict[str, str]) -> None:
        """Merge swift's summary (finite numbers or null) into the task's ``metrics``."""
        metrics = {**self.task.metrics, **{k: v for k, v in summary.items() if k != NONFINITE_KEY}}
        self.set(metrics=metrics)
        self._mark_nonfinite({key: nonfinite.get(key) for key in summary})

    def set(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.task, name, value)
            self._dirty.add(name)

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        """Record a lifecycle event now, or with the next write that succeeds (it keeps its time)."""
        self._events.append(_Event(kind, message, json_safe(data), timezone.now()))
        self.flush(force=True)

    @property
    def pending(self) -> bool:
        return bool(self._lines or self._metrics or self._dirty or self._events)

    @property
    def full(self) -> bool:
        """The buffer holds as much as it may: read no more output until a flush drains it."""
        return self._chars >= MAX_BUFFERED_CHARS or len(self._metrics) >= MAX_BUFFERED_POINTS

    def _mark_nonfinite(self, marks: dict[str, str | None]) -> None:
        metrics = self.task.metrics if isinstance(self.task.metrics, dict) else {}
        current: dict[str, str] = dict(metrics.get(NONFINITE_KEY) or {})
        wanted = {**current, **{k: v for k, v in marks.items() if v is not None}}
        for key in (k for k, v in marks.items() if v is None):
            wanted.pop(key, None)
        if wanted == current and (wanted or NONFINITE_KEY not in metrics):
            return
        updated = {k: v for k, v in metrics.items() if k != NONFINITE_KEY}
        if wanted:
            updated[NONFINITE_KEY] = wanted
        self.set(metrics=updated)

    # --- writing ------------------------------------------------------------------------------
    def flush(self, *, force: bool = False) -> bool:
        """Write what is buffered (every ``interval`` seconds unless ``force``). Returns True when
        nothing is left to write. A database error never escapes: the buffer is kept for the next
        try, which waits for the backoff even when forced."""
        if not self.pending or self.fenced:
            return True
        if not self.backoff.ready():
            return False
        now = time.monotonic()
        if not force and now - self._last_flush < self.interval:
            return False
        self._last_flush = now
        try:
            if self._unconfirmed is not None:
                self._confirm()
            while self.pending:
                self._write_batch()
        except DatabaseError as exc:
            database_failed(exc, what=f"Writing the progress of task {self.task.pk}", backoff=self.backoff, since=now)
            return False
        except Fenced:
            self.fenced = True
            self._lines, self._chars, self._events, self._unconfirmed = [], 0, [], None
            self._metrics.clear()
            self._dirty.clear()
            return True
        down = self.backoff.succeeded()
        if down is not None:
            logger.warning("The database is back after %.0f s: the progress of task %s is written", down, self.task.pk)
        return True

    def _confirm(self) -> None:
        """After a failed write: did it commit after all (its COMMIT's answer was lost)?"""
        attempt = self._unconfirmed
        assert attempt is not None
        if attempt.lines:
            committed = TaskLogLine.objects.filter(task=self.task, seq=attempt.last_seq).exists()
        elif attempt.first_event is not None:
            # Event times come from this process's clock, and an event is never written twice.
            event = attempt.first_event
            committed = TaskEvent.objects.filter(task=self.task, kind=event.kind, message=event.message,
                                                 created_at__gte=event.at).exists()
        else:
            committed = False
        self._unconfirmed = None
        if committed:
            logger.warning("task %s: the write that failed had committed; not writing it again", self.task.pk)
            self._forget(lines=attempt.lines, events=attempt.events)
            self.task.last_log_seq = attempt.last_seq

    def _forget(self, *, lines: int, events: int) -> None:
        self._chars -= sum(len(text) + _LINE_OVERHEAD for text, _ in self._lines[:lines])
        del self._lines[:lines]
        del self._events[:events]

    def _write_batch(self) -> None:
        task = self.task
        first_seq = task.last_log_seq + 1
        rows = [TaskLogLine(task=task, seq=first_seq + i, text=text, created_at=at)
                for i, (text, at) in enumerate(self._lines[:WRITE_BATCH_LINES])]
        points = list(self._metrics.values())
        events = list(self._events)
        dirty = self._dirty - {"heartbeat_at", "last_log_seq"}
        fields = {name: getattr(task, name) for name in dirty}
        last_seq = rows[-1].seq if rows else task.last_log_seq
        if rows:
            fields["last_log_seq"] = last_seq
        self._unconfirmed = _Attempt(lines=len(rows), last_seq=last_seq, events=len(events),
                                     first_event=events[0] if events else None)
        written = _Written(rows=rows, points=points)
        with transaction.atomic():
            if self.guard is not None and not self.guard():
                raise Fenced
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
            written.events = [self._insert_event(e) for e in events]
            if fields:
                FinetuningTask.objects.filter(pk=task.pk).update(**fields)
        self._unconfirmed = None
        self._forget(lines=len(rows), events=len(events))
        self._metrics.clear()
        self._dirty.clear()
        task.last_log_seq = last_seq
        self._broadcast(written)

    def _insert_event(self, pending: _Event) -> TaskEvent:
        event = TaskEvent.objects.create(task=self.task, kind=pending.kind, message=pending.message, data=pending.data)
        if (event.created_at - pending.at).total_seconds() > 1.0:
            # Written late (the database was away): the timeline shows when it happened.
            TaskEvent.objects.filter(pk=event.pk).update(created_at=pending.at)
            event.created_at = pending.at
        return event

    def _broadcast(self, written: _Written) -> None:
        task = self.task
        payload: dict[str, Any] = {f: getattr(task, f) for f in PROGRESS_FIELDS}
        payload[NONFINITE_KEY] = dict(task.metrics.get(NONFINITE_KEY) or {}) if isinstance(task.metrics, dict) else {}
        if written.rows:
            # A burst is not broadcast whole (a message of megabytes times out in the layer); the
            # consumer reads the lines it was not sent from the database, by sequence number.
            payload["lines"] = [{"seq": r.seq, "text": r.text, "time": _iso(r.created_at)}
                                for r in written.rows[:MAX_BROADCAST_LINES]]
        if written.points:
            payload["metrics"] = [self._metric_payload(p) for p in written.points]
        if written.events:
            payload["events"] = [{"kind": e.kind, "message": e.message, "time": _iso(e.created_at)}
                                 for e in written.events]
        broadcast(task, payload)

    def _metric_row(self, p: MetricPoint) -> TaskMetric:
        values: dict[str, Any] = {**p.values, NONFINITE_KEY: p.nonfinite} if p.nonfinite else dict(p.values)
        return TaskMetric(
            task=self.task, kind=p.kind, step=p.step, epoch=p.epoch, loss=p.loss, learning_rate=p.learning_rate,
            grad_norm=p.grad_norm, token_acc=p.token_acc, memory_gib=p.memory_gib,
            seconds_per_step=p.seconds_per_step, values=json_safe(values),
        )

    @staticmethod
    def _metric_payload(p: MetricPoint) -> dict[str, Any]:
        payload = {"kind": p.kind, "step": p.step, "epoch": p.epoch, "loss": p.loss,
                   "learning_rate": p.learning_rate, "grad_norm": p.grad_norm, "token_acc": p.token_acc}
        if p.nonfinite:
            payload[NONFINITE_KEY] = p.nonfinite
        return payload


def publish_event(task: FinetuningTask, kind: str, message: str = "", **data: Any) -> TaskEvent:
    """Record a lifecycle event and broadcast it with the task's current progress fields."""
    event = TaskEvent.objects.create(task=task, kind=kind, message=message, data=data)
    broadcast(task, {"event": {"kind": kind, "message": message, "time": _iso(event.created_at)},
                     **{f: getattr(task, f) for f in PROGRESS_FIELDS}})
    return event

"""The live sockets of the tasks app, on the bases of :mod:`core.live` (docs/live.md):

* **Task** (``/ws/tasks/<id>/?after=<seq>``, a :class:`~core.live.sockets.StreamConsumer`): everything after
  ``after`` from the database (log lines in batches, every metric point and event, the task's state),
  then live updates from the task's group. Without ``?after`` the socket waits up to a second for a
  ``{"type": "resume", "after": N}`` before starting from 0; ``{"type": "backfill", "after": N}``
  restarts from ``N``. Requests are rate-limited and a catch-up is bounded (``"more": true``: the
  page asks again); a message that would pass ``core.live.sockets.MAX_MESSAGE_BYTES`` goes in parts.
* **List** (``/ws/tasks/?ids=1,2&latest=N&lang=xx``, a :class:`~core.live.sockets.SnapshotConsumer`): the
  watched tasks' rows when they change (state and the row rendered by ``tasks/_task_row.html``),
  ``gone`` for deleted ones, ``new_tasks`` when the user has tasks newer than ``latest``.
* **Queue** (``/ws/queue/``, and the ``queue`` topic of ``/ws/gpus/``): the waiting tasks, a
  :class:`~core.live.topics.SharedSnapshot` computed once per change for every socket of the process.

Messages to the browser (JSON): ``{"type": "update", "state": {...}?, "lines": [{seq, text, time}]?,
"metrics": [...]?, "events": [...]?, "cards": "<revision>"?}``, ``{"type": "deleted"}``, ``{"type":
"tasks", "tasks": [{...state, "html"}]}``, ``{"type": "gone", "ids": [...]}``, ``{"type":
"new_tasks"}``, ``{"type": "queue", "entries": [...], "html": {"entries", "summary"}}``. Numbers are
finite or ``null``: where swift reported NaN or ±infinity, ``nonfinite`` names the kind
(``{"loss": "nan"}``). ``cards`` is the revision of the task page's server-rendered cards (error,
details, checkpoints, exports, command line; :func:`tasks.selectors.task_cards_revision`), sent when
it changes: the page then fetches ``/tasks/<id>/cards/`` once and swaps them in.

What reaches a task's group: every flush of the runner's publisher and every event
(:func:`tasks.publisher.broadcast`); the task lists and the queue get a summary of each on
:data:`tasks.publisher.TASKS_GROUP`. A notice with ``deleted`` (or a task that is gone when read)
closes the task socket with 4404.
"""

from __future__ import annotations

import asyncio
import types
from datetime import datetime
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _

from core.live.sockets import CLOSE_NOT_FOUND, SnapshotConsumer, StreamConsumer, query_language
from core.live.topics import SharedSnapshot, TopicConsumer, register_topic
from core.swift_cli.output import json_safe
from tasks import selectors
from tasks.models import TERMINAL_STATUSES, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric
from tasks.publisher import NONFINITE_KEY, PROGRESS_FIELDS, TASKS_GROUP, task_group
from tasks.selectors import queue_overview, starts_in_text

#: Without ``?after`` a task socket waits this long for a ``resume`` message before starting at 0.
RESUME_WAIT_SECONDS = 1.0
#: A list socket follows at most this many tasks.
MAX_WATCHED = 200
#: What the rendered rows carry in their forms instead of a CSRF token: the page puts its own in.
CSRF_PLACEHOLDER = "live"

#: Fields that change on every read; sent along with a real change only (pages tick them locally).
VOLATILE_FIELDS = ("elapsed_seconds",)
#: A change of one of these may change the task page's cards (see ``task_cards_revision``).
CARD_TRIGGER_FIELDS = frozenset({"status", "last_checkpoint", "error_message", "stop_requested", "wait_reason"})
#: What a list row shows; a row is sent again when one of these changes.
LIST_FIELDS = ("status", "progress", "current_step", "max_steps", "loss", "eta_seconds", NONFINITE_KEY, "finished_at")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _nonfinite(values: Any) -> dict[str, str]:
    marks = values.get(NONFINITE_KEY) if isinstance(values, dict) else None
    return dict(marks) if isinstance(marks, dict) else {}


def task_state(task: FinetuningTask) -> dict[str, Any]:
    """What the pages show of a task, as JSON-ready values."""
    return {
        "id": task.pk,
        "status": task.status,
        "progress": task.progress,
        "current_step": task.current_step,
        "max_steps": task.max_steps,
        "epoch": task.epoch,
        "loss": task.loss,
        "learning_rate": task.learning_rate,
        # Kinds of the values above (and of the summary's) that swift reported as NaN / ±infinity.
        NONFINITE_KEY: _nonfinite(task.metrics),
        "eta_seconds": task.eta_seconds,
        "elapsed_seconds": task.elapsed_seconds,
        "last_checkpoint": task.last_checkpoint,
        "last_log_seq": task.last_log_seq,
        "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "error_message": task.error_message,
        "exit_code": task.exit_code,
        "stop_requested": task.stop_requested_at is not None,
        "is_active": task.is_active,
        # Why the dispatcher passes the waiting task over (a quota), in words; "" otherwise.
        "wait_reason": task.wait_reason,
    }


def line_payload(line: TaskLogLine) -> dict[str, Any]:
    return {"seq": line.seq, "text": line.text, "time": _iso(line.created_at)}


def metric_payload(point: TaskMetric) -> dict[str, Any]:
    payload = {
        "kind": point.kind,
        "step": point.step,
        "epoch": point.epoch,
        "loss": point.loss,
        "learning_rate": point.learning_rate,
        "grad_norm": point.grad_norm,
        "token_acc": point.token_acc,
    }
    marks = _nonfinite(point.values)
    if marks:
        payload[NONFINITE_KEY] = marks
    return payload


def event_payload(event: TaskEvent) -> dict[str, Any]:
    return {"kind": event.kind, "message": event.message, "time": _iso(event.created_at)}


def _parse_ids(raw: Any) -> set[int]:
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, list):
        return set()
    ids: set[int] = set()
    for item in raw[:MAX_WATCHED]:
        try:
            ids.add(int(item))
        except (TypeError, ValueError):
            continue
    return ids


# --- one task ------------------------------------------------------------------------------------
class TaskConsumer(StreamConsumer):
    """Live updates of one task for its owner (or staff)."""

    task_id: int

    async def authorize(self) -> bool:
        task = await database_sync_to_async(selectors.finetuning_task_find)(
            user=self.user, pk=self.scope["url_route"]["kwargs"]["task_id"]
        )
        if task is None:
            return False
        self.task_id = task.pk
        self.metric_id = 0
        self.event_id = 0
        self.state: dict[str, Any] = {}
        self.cards_rev: str | None = None
        self.waiting: asyncio.Task[None] | None = None
        return True

    def live_groups(self) -> list[str]:
        return [task_group(self.task_id)]

    async def reauthorize(self) -> bool:
        task = await database_sync_to_async(selectors.finetuning_task_find)(user=self.user, pk=self.task_id)
        return task is not None

    def read_lines(self, *, after: int, limit: int) -> list[dict[str, Any]]:
        return [line_payload(line) for line in selectors.task_log_lines(task=self.task_id, after=after, limit=limit)]

    async def start(self) -> None:
        # The page drew its chart from a sample of the points up to this id (0: send every point).
        self.metric_id = self.query_after("metrics_after") or 0
        self.sent_seq = self.query_after()
        if self.sent_seq is None:
            self.waiting = asyncio.create_task(self._start_without_resume())
        await self.resync()

    async def _start_without_resume(self) -> None:
        await asyncio.sleep(RESUME_WAIT_SECONDS)
        async with self.lock:
            if self.sent_seq is None and not self.closing:
                self.sent_seq = 0
                await self.resync()

    async def stopped(self) -> None:
        if getattr(self, "waiting", None) is not None:
            self.waiting.cancel()

    async def resync(self, task: FinetuningTask | None = None) -> None:
        """Send whatever the page lacks, read from the database. Called with ``self.lock`` held."""
        if task is None:
            task = await database_sync_to_async(selectors.finetuning_task_find)(user=self.user, pk=self.task_id)
            if task is None:
                await self._gone()
                return
        await self.send_lines_from_db(upto=task.last_log_seq)
        metrics, events = await database_sync_to_async(self._read_metrics_and_events)()
        out: dict[str, Any] = {"type": "update"}
        if metrics:
            out["metrics"] = metrics
        if events:
            out["events"] = events
        changed = self._merge_state(task_state(task), authoritative=True)
        if changed:
            out["state"] = changed
        await self._add_cards(out, task)
        if len(out) > 1:
            await self.send_split(out)  # every metric and event after the cursors: in parts if need be

    async def on_live(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for _group, message in batch:
            if self.closing:
                return
            await self._take(message)

    async def _take(self, message: dict[str, Any]) -> None:
        """One notice: from the runner's publisher (a flush) or an event."""
        if message.get("deleted"):
            await self.resync()  # reads the task: gone → tells the page and closes
            return
        if await self.take_lines(message.get("lines") or [], message.get("last_log_seq")):
            # A message was lost: its metrics and events too. Read everything after the cursors.
            await self.resync()
            return
        out: dict[str, Any] = {"type": "update"}
        if message.get("metrics"):
            out["metrics"] = message["metrics"]
        events = list(message.get("events") or []) + ([message["event"]] if message.get("event") else [])
        if events:
            out["events"] = events
        fields = {key: message[key] for key in (*PROGRESS_FIELDS, NONFINITE_KEY, "wait_reason") if key in message}
        task: FinetuningTask | None = None
        if fields.get("status") and fields["status"] != self.state.get("status"):
            # A new status brings fields the publisher does not carry (times, error): read them.
            task = await database_sync_to_async(selectors.finetuning_task_find)(user=self.user, pk=self.task_id)
            if task is None:
                await self._gone()
                return
            fields = task_state(task)
        changed = self._merge_state(fields)
        if changed:
            out["state"] = changed
        if events or message.get("export") or CARD_TRIGGER_FIELDS & changed.keys():
            await self._add_cards(out, task if task is not None else self.task_id)
        if len(out) > 1:
            await self.send_split(out)

    async def _add_cards(self, out: dict[str, Any], task: FinetuningTask | int) -> None:
        """Put the cards revision into ``out`` when it differs from the one last sent."""
        rev = await database_sync_to_async(selectors.task_cards_revision)(task=task)
        if rev and rev != self.cards_rev:
            self.cards_rev = rev
            out["cards"] = rev

    def _read_metrics_and_events(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        metrics = selectors.task_metrics_after(task=self.task_id, after_id=self.metric_id)
        if metrics:
            self.metric_id = metrics[-1].pk
        events = selectors.task_events_after(task=self.task_id, after_id=self.event_id)
        if events:
            self.event_id = events[-1].pk
        return [metric_payload(m) for m in metrics], [event_payload(e) for e in events]

    def _merge_state(self, fields: dict[str, Any], *, authoritative: bool = False) -> dict[str, Any]:
        """Record ``fields`` as sent and return those that changed. A terminal status never goes
        back to an active one because of a late live message (the database read is authoritative)."""
        if (
            not authoritative
            and self.state.get("status") in TERMINAL_STATUSES
            and fields.get("status") not in (None, *TERMINAL_STATUSES)
        ):
            return {}
        changed = {
            key: value
            for key, value in json_safe(fields).items()
            if key not in VOLATILE_FIELDS and self.state.get(key, object()) != value
        }
        if changed:
            changed.update({key: fields[key] for key in VOLATILE_FIELDS if key in fields})
        self.state.update(changed)
        return changed

    async def _gone(self) -> None:
        await self.close_with(CLOSE_NOT_FOUND, {"type": "deleted"})


# --- the user's task list ------------------------------------------------------------------------
class TaskListConsumer(SnapshotConsumer):
    """Live rows of a task list page (dashboard, task list): the tasks it shows, as they change."""

    volatile: ClassVar[frozenset[str]] = frozenset({"elapsed_seconds", "html"})
    #: A running task's publisher flushes several times a second; its row needs no more than this.
    min_interval: ClassVar[float] = 0.5

    async def authorize(self) -> bool:
        self.watched: set[int] = _parse_ids((self.query.get("ids") or [""])[0])
        try:
            self.latest = int((self.query.get("latest") or ["0"])[0])
        except ValueError:
            self.latest = 0
        self.language = query_language(self.query)
        self.announced_new = False
        return True

    def live_groups(self) -> list[str]:
        return [TASKS_GROUP]

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "watch":
            ids = _parse_ids(content.get("ids"))
            try:
                latest = int(content.get("latest", self.latest))
            except (TypeError, ValueError):
                latest = self.latest

            async def watch() -> None:  # a read: rate-limited like a refresh (the latest watch wins)
                self.watched, self.latest = ids, latest
                await self.send_snapshot(None)

            self.request(watch)
            return
        await super().receive_json(content, **kwargs)

    async def snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
        ids = set(self.watched)
        check_new = batch is None
        if batch is not None:
            # Summaries of every task reach the process: keep those about this page.
            ids &= {payload.get("task") for _group, payload in batch}
            check_new = any(self._is_creation(payload) for _group, payload in batch)
            if not ids and not check_new:
                return []
        return await database_sync_to_async(self._read)(ids, check_new)

    def _is_creation(self, payload: dict[str, Any]) -> bool:
        kinds = [e.get("kind") for e in [payload.get("event") or {}, *(payload.get("events") or [])]]
        return "created" in kinds and payload.get("owner") == self.user.pk

    def _read(self, ids: set[int], check_new: bool) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        rows = selectors.finetuning_task_rows(user=self.user, ids=sorted(ids)) if ids else []
        with translation.override(self.language):
            for task in rows:
                state = {**task_state(task), "html": render_to_string("tasks/_task_row.html", {"task": task})}
                state = {key: state[key] for key in ("id", *LIST_FIELDS, "elapsed_seconds", "html")}
                messages.append({"type": "tasks", "tasks": [state], "key": f"task.{task.pk}"})
        gone = sorted(ids - {task.pk for task in rows})
        if gone:
            self.watched -= set(gone)
            messages.append({"type": "gone", "ids": gone, "key": f"gone.{','.join(map(str, gone))}"})
        if check_new and self.latest and not self.announced_new:
            latest = selectors.finetuning_task_list(user=self.user).order_by("-pk").values_list("pk", flat=True).first()
            if (latest or 0) > self.latest:
                self.announced_new = True
                messages.append({"type": "new_tasks"})
        return messages


# --- the queue -----------------------------------------------------------------------------------
#: Who the queue is computed for once per change: someone who may see every waiting task.
_SEES_ALL = types.SimpleNamespace(pk=None, is_staff=True, is_authenticated=True)


def _viewers_entry(entry: dict[str, Any], user: Any) -> dict[str, Any]:
    """An entry of the queue as computed for everyone, as ``user`` may see it (the rule of
    ``tasks.selectors.queue_entries``: named to its owner and staff, anonymous to others)."""
    mine = entry["owner"] is not None and entry["owner"] == user.get_username()
    if user.is_staff or mine:
        return {**entry, "mine": mine}
    return {**entry, "visible": False, "id": None, "name": _("another user's task"), "owner": None,
            "mine": False, "url": None}


@register_topic
class QueueSnapshot(SharedSnapshot):
    """The waiting tasks in dispatch order, for the queue page (and the ``queue`` topic). Computed
    once per change and language, then narrowed to each viewer without reading again."""

    topic = "queue"
    groups = (TASKS_GROUP,)

    def compute_all(self, viewers: dict[Any, tuple[Any, str]]) -> dict[Any, dict[str, Any]]:
        everyone: dict[str, list[dict[str, Any]]] = {}
        results = {}
        for key, (user, language) in viewers.items():
            with translation.override(language):
                if language not in everyone:
                    everyone[language] = queue_overview(user=_SEES_ALL)
                entries = [_viewers_entry(entry, user) for entry in everyone[language]]
                results[key] = {"type": "queue", "entries": entries, "html": self._html(entries, user)}
        return results

    @staticmethod
    def _html(entries: list[dict[str, Any]], user: Any) -> dict[str, str]:
        rows = "".join(
            render_to_string("tasks/_queue_row.html", {
                "entry": {**entry, "starts_in_text": starts_in_text(entry["starts_in_seconds"])},
                "user": user, "csrf_token": CSRF_PLACEHOLDER,
            })
            for entry in entries
        )
        summary = _("Waiting: %(n)s · on hold: %(held)s · yours: %(mine)s") % {
            "n": len(entries),
            "held": sum(1 for e in entries if e["held"]),
            "mine": sum(1 for e in entries if e["mine"]),
        }
        return {"entries": rows, "summary": summary}


class QueueConsumer(TopicConsumer):
    """The queue page's socket (``/ws/queue/``)."""

    topics = ("queue",)
    volatile: ClassVar[frozenset[str]] = frozenset({"waited_seconds", "starts_in_seconds", "html"})

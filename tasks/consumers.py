"""WebSocket consumers of the live pages: one task (``/ws/tasks/<id>/``) and a task list (``/ws/tasks/``).

The database is the truth; the channel layer only makes updates fast. Both consumers authorise at
connect through ``for_user`` (anonymous: close 4401; another user's task: close 4404, before any
``group_add``), then:

* **Task** (``/ws/tasks/<id>/?after=<seq>``): sends everything after ``after`` from the database
  (log lines in batches, every metric point and event, the task's state), then live updates. Log
  lines carry contiguous sequence numbers; the consumer forwards only lines after the last one it
  sent and, when a live batch does not follow on (the layer dropped a message), first reads the
  missing lines from the database. A client may also send ``{"type": "resume"|"backfill",
  "after": N}`` to (re)start from ``N`` (without ``?after`` the consumer waits up to a second for
  a ``resume`` before starting from 0).
* **List** (``/ws/tasks/?ids=1,2``, or ``{"type": "watch", "ids": [...], "latest": N}``): sends the
  state of the watched tasks whenever it changes, ``gone`` for deleted ones, and ``new_tasks``
  when the user has tasks newer than ``latest``.

Messages to the browser (JSON): ``{"type": "update", "state": {...}?, "lines": [{seq, text,
time}]?, "metrics": [...]?, "events": [...]?, "cards": "<revision>"?}``, ``{"type": "deleted"}``,
``{"type": "tasks", "tasks": [...]}``, ``{"type": "gone", "ids": [...]}``, ``{"type": "new_tasks"}``.
Numbers are finite or ``null``: where swift reported NaN or ±infinity, ``nonfinite`` (in a state
and in a metric point) names the kind (``{"loss": "nan"}``) so the page can show "NaN" / "∞"; every
message is encoded with ``allow_nan=False`` semantics (a stray non-finite float becomes ``null``).
``cards`` is the revision of the task page's server-rendered cards (error, details, checkpoints,
exports, command line; :func:`tasks.selectors.task_cards_revision`), sent when it changes: the page
then fetches ``/tasks/<id>/cards/`` and swaps them in. It is re-read on every event, on a change of
status or last checkpoint, and at each re-check (an export's progress has no event of its own).

Delivery: with a cross-process layer (Redis) the runner's publisher broadcasts, and each consumer
re-checks the database every ``RECHECK_SECONDS`` so a dropped message is repaired without a reload.
With the embedded default (``InMemoryChannelLayer``: the publisher does not broadcast) one
:class:`TaskFollower` per task and web process polls the row every ``LIVE_POLL_SECONDS`` and sends
what changed to the process's own group, so the consumers handle both cases with the same code.
Group membership is renewed every ``GROUP_REFRESH_SECONDS`` (channels-redis expires it after a day).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from tasks import selectors
from tasks.models import TERMINAL_STATUSES, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric
from tasks.publisher import NONFINITE_KEY, PROGRESS_FIELDS, task_group, user_group
from tasks.swift_output import json_safe

logger = logging.getLogger(__name__)

#: Embedded default: how often a task's follower reads the database (the pages' live delay).
LIVE_POLL_SECONDS = 0.5
#: Always: how often each consumer re-checks the database (repairs what a layer dropped).
RECHECK_SECONDS = 5.0
#: Re-``group_add`` this often; channels-redis forgets group members after ``group_expiry`` (1 day).
GROUP_REFRESH_SECONDS = 3600.0
#: Log lines per message when catching up from the database.
BACKFILL_BATCH = 2000
#: Largest WebSocket message sent (daphne refuses to send more than 1 MiB in one message).
MAX_MESSAGE_BYTES = 512 * 1024
#: A longer log line is cut here in the live view (the downloaded log keeps it whole).
MAX_LINE_CHARS = 64 * 1024
#: Without ``?after`` a task socket waits this long for a ``resume`` message before starting at 0.
RESUME_WAIT_SECONDS = 1.0
#: A list socket follows at most this many tasks.
MAX_WATCHED = 200

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404

#: Fields that change on every read; sent along with a real change only (pages tick them locally).
VOLATILE_FIELDS = ("elapsed_seconds",)
#: A change of one of these may change the task page's cards (see ``task_cards_revision``).
CARD_TRIGGER_FIELDS = frozenset({"status", "last_checkpoint", "error_message", "stop_requested"})
#: What a list row shows; sent when one of these changes.
LIST_FIELDS = ("status", "progress", "current_step", "max_steps", "loss", "eta_seconds", NONFINITE_KEY)


def cross_process_layer() -> bool:
    """True when the channel layer reaches other processes (Redis): the publisher then broadcasts."""
    return "InMemoryChannelLayer" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def encode_finite_json(content: Any) -> str:
    """JSON a browser's ``JSON.parse`` accepts: ``NaN``/``Infinity`` are not JSON, so a non-finite
    float (which the database never holds; this is the last guard) is sent as ``null``."""
    try:
        return json.dumps(content, allow_nan=False)
    except ValueError:
        return json.dumps(json_safe(content), allow_nan=False)


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


def _parse_after(scope: dict[str, Any]) -> int | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("after")
    if not values:
        return None
    try:
        return max(0, int(values[0]))
    except ValueError:
        return 0


def _parse_ids(raw: Any) -> set[int]:
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, list):
        return set()
    ids: set[int] = set()
    for item in raw[:MAX_WATCHED]:
        with contextlib.suppress(TypeError, ValueError):
            ids.add(int(item))
    return ids


# --- the embedded default: follow the database ----------------------------------------------------

async def recheck(consumer: Any, what: str) -> None:
    """One periodic round of a consumer: re-join its group before channels-redis expires the
    membership (24 h), then repair anything a dropped message missed from the database."""
    try:
        if time.monotonic() - consumer.joined_at >= GROUP_REFRESH_SECONDS:
            await consumer.channel_layer.group_add(consumer.group, consumer.channel_name)
            consumer.joined_at = time.monotonic()
        async with consumer.lock:
            await consumer._catch_up()
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - keep the socket alive; the next round retries
        logger.warning("re-check of %s failed", what, exc_info=True)


class TaskFollower:
    """Polls one task's row for the consumers of this process and group_sends what changed.

    Only used without a cross-process layer, where the runner (another process) cannot reach the
    web process. One per task and event loop, however many browsers watch it.
    """

    _active: ClassVar[dict[tuple[int, int], TaskFollower]] = {}

    def __init__(self, task_id: int, layer: Any) -> None:
        self.task_id = task_id
        self.layer = layer
        self.refs = 0
        self.seq = 0
        self.metric_id = 0
        self.event_id = 0
        self.fields: dict[str, Any] = {}
        self.runner: asyncio.Task[None] | None = None

    @classmethod
    async def acquire(cls, task_id: int, layer: Any) -> None:
        key = (id(asyncio.get_running_loop()), task_id)
        follower = cls._active.get(key)
        if follower is None or follower.runner is None or follower.runner.done():
            follower = cls(task_id, layer)
            await database_sync_to_async(follower._start_cursors)()
            cls._active[key] = follower
            follower.runner = asyncio.create_task(follower._run())
        follower.refs += 1

    @classmethod
    def release(cls, task_id: int) -> None:
        key = (id(asyncio.get_running_loop()), task_id)
        follower = cls._active.get(key)
        if follower is None:
            return
        follower.refs -= 1
        if follower.refs <= 0:
            cls._active.pop(key, None)
            if follower.runner is not None:
                follower.runner.cancel()

    def _row(self) -> dict[str, Any] | None:
        """The progress fields, with the kinds of those swift reported as NaN / ±infinity."""
        row = FinetuningTask.objects.filter(pk=self.task_id).values(*PROGRESS_FIELDS, "metrics").first()
        if row is not None:
            row[NONFINITE_KEY] = _nonfinite(row.pop("metrics"))
        return row

    def _start_cursors(self) -> None:
        row = self._row()
        if row is None:
            return
        self.fields = row
        self.seq = row["last_log_seq"]
        last_metric = TaskMetric.objects.filter(task_id=self.task_id).order_by("-pk").values_list("pk", flat=True)
        self.metric_id = last_metric.first() or 0
        last_event = TaskEvent.objects.filter(task_id=self.task_id).order_by("-pk").values_list("pk", flat=True)
        self.event_id = last_event.first() or 0

    def _changes(self) -> tuple[dict[str, Any] | None, bool]:
        """The next message (as the publisher would send it) and whether more lines are waiting."""
        row = self._row()
        if row is None:
            return {"type": "task.update", "task": self.task_id, "deleted": True}, False
        message: dict[str, Any] = {}
        more = False
        if row["last_log_seq"] > self.seq:
            lines = selectors.task_log_lines(task=self.task_id, after=self.seq, limit=BACKFILL_BATCH)
            if lines:
                self.seq = lines[-1].seq
                message["lines"] = [line_payload(line) for line in lines]
                more = self.seq < row["last_log_seq"]
        metrics = selectors.task_metrics_after(task=self.task_id, after_id=self.metric_id)
        if metrics:
            self.metric_id = metrics[-1].pk
            message["metrics"] = [metric_payload(m) for m in metrics]
        events = selectors.task_events_after(task=self.task_id, after_id=self.event_id)
        if events:
            self.event_id = events[-1].pk
            message["events"] = [event_payload(e) for e in events]
        if not message and row == self.fields:
            return None, False
        self.fields = row
        return {"type": "task.update", "task": self.task_id, **row, **message}, more

    async def _run(self) -> None:
        group = task_group(self.task_id)
        while True:
            try:
                message, more = await database_sync_to_async(self._changes)()
                if message is not None:
                    await self.layer.group_send(group, message)
                if message is not None and message.get("deleted"):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not end live updates
                logger.warning("following task %s failed; retrying", self.task_id, exc_info=True)
                more = False
            if not more:
                await asyncio.sleep(LIVE_POLL_SECONDS)


# --- one task ------------------------------------------------------------------------------------
class TaskConsumer(AsyncJsonWebsocketConsumer):
    """Live updates of one task for its owner (or staff)."""

    user: Any
    task_id: int

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return encode_finite_json(content)
    sent_seq: int | None

    async def connect(self) -> None:
        self.joined = False
        self.following = False
        self.loop_task: asyncio.Task[None] | None = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        task = await database_sync_to_async(selectors.finetuning_task_find)(
            user=user, pk=self.scope["url_route"]["kwargs"]["task_id"]
        )
        if task is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.user = user
        self.task_id = task.pk
        self.group = task_group(task.pk)
        self.sent_seq = _parse_after(self.scope)
        self.metric_id = 0
        self.event_id = 0
        self.state: dict[str, Any] = {}
        self.cards_rev: str | None = None
        self.lock = asyncio.Lock()
        # Join before reading the database: whatever is published after the read arrives live.
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.joined = True
        self.joined_at = time.monotonic()
        if not cross_process_layer():
            await TaskFollower.acquire(task.pk, self.channel_layer)
            self.following = True
        await self.accept()
        async with self.lock:
            await self._catch_up(task)
        self.loop_task = asyncio.create_task(self._recheck_loop())

    async def disconnect(self, code: int) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
        if self.following:
            TaskFollower.release(self.task_id)
            self.following = False
        if self.joined:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.joined = False

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or content.get("type") not in ("resume", "backfill"):
            return
        try:
            after = max(0, int(content.get("after", 0)))
        except (TypeError, ValueError):
            return
        async with self.lock:
            # The client says it holds every line up to ``after``: continue from there (it drops
            # any line it already has).
            self.sent_seq = after
            await self._catch_up()

    # --- live messages ---------------------------------------------------------------------------
    async def task_update(self, message: dict[str, Any]) -> None:
        """A group message from the publisher (Redis) or this process's follower."""
        if message.get("deleted"):
            await self._gone()
            return
        async with self.lock:
            out: dict[str, Any] = {"type": "update"}
            lines = message.get("lines") or []
            if self.sent_seq is not None:
                fresh = [line for line in lines if line["seq"] > self.sent_seq]
                contiguous = all(b["seq"] == a["seq"] + 1 for a, b in zip(fresh, fresh[1:], strict=False))
                if fresh and (fresh[0]["seq"] != self.sent_seq + 1 or not contiguous):
                    # A message was lost (or arrived out of order): the database has every line.
                    await self._send_lines_from_db(upto=fresh[-1]["seq"])
                    fresh = [line for line in lines if line["seq"] > self.sent_seq]
                if fresh:
                    await self._send_lines(fresh)
                    self.sent_seq = fresh[-1]["seq"]
                if (message.get("last_log_seq") or 0) > self.sent_seq:
                    # Lines the message does not carry (e.g. a batch too large to broadcast).
                    await self._send_lines_from_db(upto=message["last_log_seq"])
            if message.get("metrics"):
                out["metrics"] = message["metrics"]
            events = list(message.get("events") or []) + ([message["event"]] if message.get("event") else [])
            if events:
                out["events"] = events
            fields = {key: message[key] for key in (*PROGRESS_FIELDS, NONFINITE_KEY) if key in message}
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
            if events or CARD_TRIGGER_FIELDS & changed.keys():
                await self._add_cards(out, task if task is not None else self.task_id)
            if len(out) > 1:
                await self.send_json(out)

    # --- the database ---------------------------------------------------------------------------
    async def _recheck_loop(self) -> None:
        if self.sent_seq is None:
            await asyncio.sleep(RESUME_WAIT_SECONDS)
            async with self.lock:
                if self.sent_seq is None:
                    self.sent_seq = 0
                    await self._catch_up()
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            await recheck(self, f"task {self.task_id}")

    async def _catch_up(self, task: FinetuningTask | None = None) -> None:
        """Send whatever the client lacks, read from the database. Call with ``self.lock`` held."""
        if task is None:
            task = await database_sync_to_async(selectors.finetuning_task_find)(user=self.user, pk=self.task_id)
            if task is None:
                await self._gone()
                return
        await self._send_lines_from_db(upto=task.last_log_seq)
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
            await self.send_json(out)

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

    async def _send_lines_from_db(self, *, upto: int) -> None:
        if self.sent_seq is None:
            return
        while self.sent_seq < upto:
            lines = await database_sync_to_async(selectors.task_log_lines)(
                task=self.task_id, after=self.sent_seq, limit=BACKFILL_BATCH
            )
            if not lines:
                return
            await self._send_lines([line_payload(line) for line in lines])
            self.sent_seq = lines[-1].seq

    async def _send_lines(self, lines: list[dict[str, Any]]) -> None:
        """Send lines in messages of at most ``MAX_MESSAGE_BYTES`` (one flush may hold thousands)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for line in lines:
            if len(line["text"]) > MAX_LINE_CHARS:
                line = {**line, "text": line["text"][:MAX_LINE_CHARS] + " … [cut here; download the full log]"}
            cost = len(json.dumps(line)) + 2
            if batch and size + cost > MAX_MESSAGE_BYTES:
                await self.send_json({"type": "update", "lines": batch})
                batch, size = [], 0
            batch.append(line)
            size += cost
        if batch:
            await self.send_json({"type": "update", "lines": batch})

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
            for key, value in fields.items()
            if key not in VOLATILE_FIELDS and self.state.get(key, object()) != value
        }
        if changed:
            changed.update({key: fields[key] for key in VOLATILE_FIELDS if key in fields})
        self.state.update(changed)
        return changed

    async def _gone(self) -> None:
        await self.send_json({"type": "deleted"})
        await self.close(code=CLOSE_NOT_FOUND)


# --- the user's task list ------------------------------------------------------------------------
class TaskListConsumer(AsyncJsonWebsocketConsumer):
    """Live rows of a task list page: the tasks it shows, as they change."""

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return encode_finite_json(content)

    async def connect(self) -> None:
        self.joined = False
        self.loop_task: asyncio.Task[None] | None = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.group = user_group(user.pk)
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.watched: set[int] = _parse_ids((query.get("ids") or [""])[0])
        try:
            self.latest = int((query.get("latest") or ["0"])[0])
        except ValueError:
            self.latest = 0
        self.sent: dict[int, dict[str, Any]] = {}
        self.announced_new = False
        self.lock = asyncio.Lock()
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.joined = True
        self.joined_at = time.monotonic()
        await self.accept()
        async with self.lock:
            await self._catch_up()
        self.loop_task = asyncio.create_task(self._loop())

    async def disconnect(self, code: int) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
        if self.joined:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.joined = False

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "watch":
            return
        async with self.lock:
            self.watched = _parse_ids(content.get("ids"))
            with contextlib.suppress(TypeError, ValueError):
                self.latest = int(content.get("latest", self.latest))
            self.sent = {k: v for k, v in self.sent.items() if k in self.watched}
            await self._catch_up()

    async def task_update(self, message: dict[str, Any]) -> None:
        """A summary from the publisher (own tasks only; staff see others' through the re-check)."""
        task_id = message.get("task")
        if task_id in self.watched:
            async with self.lock:
                await self._catch_up(ids={task_id})
        elif message.get("event", {}).get("kind") == "created" and not self.announced_new:
            self.announced_new = True
            await self.send_json({"type": "new_tasks"})

    async def _loop(self) -> None:
        interval = RECHECK_SECONDS if cross_process_layer() else LIVE_POLL_SECONDS
        while True:
            await asyncio.sleep(interval)
            await recheck(self, "task list")

    def _read(self, ids: set[int]) -> tuple[list[dict[str, Any]], int]:
        rows = selectors.finetuning_task_rows(user=self.user, ids=sorted(ids))
        latest = selectors.finetuning_task_list(user=self.user).order_by("-pk").values_list("pk", flat=True).first()
        return [task_state(task) for task in rows], latest or 0

    async def _catch_up(self, ids: set[int] | None = None) -> None:
        ids = self.watched if ids is None else ids
        states, latest = await database_sync_to_async(self._read)(ids)
        changed = []
        for state in states:
            before = self.sent.get(state["id"])
            if before is None or any(before.get(k) != state[k] for k in (*LIST_FIELDS, "finished_at")):
                changed.append(state)
            self.sent[state["id"]] = state
        if changed:
            await self.send_json({"type": "tasks", "tasks": changed})
        gone = sorted(ids - {s["id"] for s in states})
        if gone:
            self.watched -= set(gone)
            await self.send_json({"type": "gone", "ids": gone})
        if self.latest and latest > self.latest and not self.announced_new:
            self.announced_new = True
            await self.send_json({"type": "new_tasks"})

"""The one live path: how a change reaches every open page (docs/live.md).

**Write side.** :func:`publish` (``group``, JSON-ready ``payload``) is the only entry point. With a
cross-process channel layer (Redis) it sends through the layer, after the surrounding transaction
commits, from one sender thread per process (one Redis connection, not one per call). With the
embedded default (no Redis: the in-memory layer cannot cross from the worker to daphne) it writes an
outbox row (:data:`OUTBOX_MODEL`) in the caller's transaction, so the notice exists exactly when the
data does.

**Read side.** One :class:`Hub` per web process (per event loop) holds the process's sockets by
group. It joins each group on the layer once, with one channel of its own, however many sockets
watch the group, and fans each message out to them in memory. Without Redis it also runs the
process's one :class:`outbox follower <Hub>`: it reads new outbox rows by id every
:data:`FOLLOW_SECONDS` and fans them out the same way. No socket reads the database on a timer of
its own.

**Sockets.** :class:`LiveConsumer` authorises at connect (anonymous: close 4401; an object the
user may not see: close 4404, before joining anything), joins its groups, then sends what the page
lacks. Messages reach it through a bounded in-memory inbox; when the inbox overflows the socket
re-synchronises from the database (the layer, too, drops messages silently: every consumer is built
to repair a loss):

* :class:`StreamConsumer`: sequence-numbered lines (``?after=N``: backfill from the database, then
  live). A live batch that does not follow on from the last line sent, or a notice announcing a
  higher last sequence, is completed from the database first; duplicates are dropped.
* :class:`SnapshotConsumer`: the current state of some rows, sent on connect and after every
  change notice (notices that arrive together are coalesced); a message goes out only when its
  content changed. A missed notice is repaired by the next one, which always re-reads.
* :class:`SharedSnapshot` + :class:`TopicConsumer`: a snapshot every socket of a process shares
  (the GPUs, the queue). It is computed once per change (and per kind of viewer), not per socket,
  and re-computed every ``refresh_seconds`` for what changes with time alone (a host falling silent).

This module is the ground floor: it imports no app. The outbox model is named by a string, like
``AUTH_USER_MODEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Hashable, Iterable
from datetime import timedelta
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.security.websocket import OriginValidator
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.utils import timezone, translation

logger = logging.getLogger(__name__)

#: The outbox of the embedded mode: ``id`` (increasing), ``group``, ``payload`` (JSON), ``created_at``.
OUTBOX_MODEL = "gpus.LiveMessage"
#: Embedded mode: how often a web process's one follower reads new outbox rows.
FOLLOW_SECONDS = 0.1
#: Outbox rows read per query (a full batch is followed by the next read at once).
FOLLOW_BATCH = 500
#: Outbox rows older than this are deleted (by the writers, at most every ``PRUNE_SECONDS``).
OUTBOX_KEEP_SECONDS = 300.0
PRUNE_SECONDS = 60.0
#: A missing outbox id (a transaction that had not committed yet, on PostgreSQL) is looked for this long.
GAP_SECONDS = 10.0
#: Re-``group_add`` this often; channels-redis forgets group members after ``group_expiry`` (1 day).
GROUP_REFRESH_SECONDS = 3600.0
#: Messages a socket may have waiting; beyond, it re-synchronises from the database instead.
INBOX_SIZE = 1000
#: How long a publish waits for Redis before it gives up (the page repairs from the database).
SEND_TIMEOUT_SECONDS = 2.0
#: Largest WebSocket message sent (daphne refuses more than 1 MiB).
MAX_MESSAGE_BYTES = 512 * 1024

#: A consumer with this alias has no channel-layer channel of its own (the alias names no layer).
NO_LAYER = "live-hub-only"

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
MESSAGE_TYPE = "live.message"
STOP_TYPE = "live.stop"


def cross_process_layer() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    return "InMemoryChannelLayer" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def outbox_model() -> Any:
    return apps.get_model(OUTBOX_MODEL)


def encode_json(content: Any) -> str:
    """JSON a browser's ``JSON.parse`` accepts (no NaN/Infinity: a stray non-finite float is null)."""
    try:
        return json.dumps(content, allow_nan=False, cls=DjangoJSONEncoder)
    except ValueError:
        return json.dumps(_finite(content), allow_nan=False, cls=DjangoJSONEncoder)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def parse_query(scope: dict[str, Any]) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def query_language(query: dict[str, list[str]]) -> str:
    """The page's language (``lang=``), for the words a socket renders."""
    codes = {code for code, _name in settings.LANGUAGES}
    values = query.get("lang")
    return values[0] if values and values[0] in codes else settings.LANGUAGE_CODE


# --- the write side ----------------------------------------------------------------------------------
def publish(group: str, payload: dict[str, Any]) -> None:
    """Tell every page watching ``group`` that something changed; ``payload`` is JSON-ready (it may
    carry the change itself, e.g. log lines with their sequence numbers). Never raises: a lost notice
    is repaired from the database."""
    publish_many([(group, payload)])


def publish_many(messages: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Several notices at once (one outbox write without Redis)."""
    batch = [(group, payload) for group, payload in messages]
    if not batch:
        return
    try:
        if cross_process_layer():
            if transaction.get_connection().in_atomic_block:
                transaction.on_commit(lambda: _Sender.get().send(batch))
            else:  # nothing to wait for (and no need to reach the database)
                _Sender.get().send(batch)
        else:
            _outbox_write(batch)
    except Exception:  # noqa: BLE001 - a notice must never break the change it announces
        logger.warning("publishing to %s failed", ", ".join(g for g, _ in batch), exc_info=True)


_last_prune = 0.0


def _outbox_write(batch: list[tuple[str, dict[str, Any]]]) -> None:
    global _last_prune
    model = outbox_model()
    # A savepoint inside the caller's transaction: a failed insert does not poison it.
    with transaction.atomic():
        model.objects.bulk_create([model(group=group, payload=_finite(payload)) for group, payload in batch])
    now = time.monotonic()
    if now - _last_prune >= PRUNE_SECONDS:
        _last_prune = now
        cutoff = timezone.now() - timedelta(seconds=OUTBOX_KEEP_SECONDS)
        with transaction.atomic():
            model.objects.filter(created_at__lt=cutoff).delete()


class _Sender:
    """One event loop thread per process that sends to the channel layer in order (channels-redis
    keeps a connection pool per loop: a loop per call would open a connection per call)."""

    _instance: ClassVar[_Sender | None] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-publish", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _Sender:
        with cls._lock:
            # A forked child (a django-q2 worker) has no copy of the thread: start its own.
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def send(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        future = asyncio.run_coroutine_threadsafe(self._send(batch), self.loop)
        try:
            future.result(timeout=SEND_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - Redis away: the pages repair from the database
            future.cancel()
            logger.warning("sending to the channel layer failed", exc_info=True)

    @staticmethod
    async def _send(batch: list[tuple[str, dict[str, Any]]]) -> None:
        layer = get_channel_layer()
        for group, payload in batch:
            await layer.group_send(group, {"type": MESSAGE_TYPE, "group": group, "payload": _finite(payload)})


# --- the read side: one hub per process ------------------------------------------------------------
class Member:
    """Something the hub delivers to: a socket or a shared snapshot."""

    def deliver(self, group: str, payload: dict[str, Any]) -> None:
        raise NotImplementedError


class Hub:
    """This process's live subscriptions (one per event loop). See the module docstring."""

    _hubs: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.members: dict[str, set[Member]] = {}
        self.shared: dict[type[SharedSnapshot], SharedSnapshot] = {}
        self.channel: str | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.lock = asyncio.Lock()
        # The outbox follower's state (embedded mode only).
        self.following = False
        self.cursor = 0
        self.gaps: dict[int, float] = {}
        self.reads = 0  #: outbox reads so far (tests count them)

    @classmethod
    def current(cls) -> Hub:
        loop = asyncio.get_running_loop()
        hub = cls._hubs.get(loop)
        if hub is None:
            hub = cls._hubs[loop] = cls()
        return hub

    @classmethod
    def running(cls) -> list[Hub]:
        """Every hub with subscribers, on a loop still open."""
        return [hub for loop, hub in list(cls._hubs.items()) if hub.members and not loop.is_closed()]

    async def join(self, group: str, member: Member) -> None:
        async with self.lock:
            if not self.tasks:
                await self._start()
            if group not in self.members:
                self.members[group] = set()
                await self.layer.group_add(group, self.channel)
            self.members[group].add(member)

    async def leave(self, group: str, member: Member) -> None:
        async with self.lock:
            members = self.members.get(group)
            if members is None:
                return
            members.discard(member)
            if not members:
                del self.members[group]
                with contextlib.suppress(Exception):
                    await self.layer.group_discard(group, self.channel)
            if not self.members:
                await self._stop()

    def deliver(self, group: str, payload: dict[str, Any]) -> None:
        for member in list(self.members.get(group, ())):
            member.deliver(group, payload)

    async def _start(self) -> None:
        self.channel = await self.layer.new_channel()
        self.tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._refresh_groups())]
        if not cross_process_layer():
            # Start from the newest row: what is older, the sockets read from the database themselves.
            self.cursor = await database_sync_to_async(self._newest_id)()
            self.gaps = {}
            self.following = True
            self.tasks.append(asyncio.create_task(self._follow()))

    async def _stop(self) -> None:
        receiver, others = self.tasks[0], self.tasks[1:]
        self.tasks = []
        for task in others:
            task.cancel()
        # The receiver is told to stop, not cancelled: a channels-redis receive cancelled in the
        # middle of its read leaves the connection broken for the process's other receivers.
        with contextlib.suppress(Exception):
            await self.layer.send(self.channel, {"type": STOP_TYPE})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(receiver), timeout=SEND_TIMEOUT_SECONDS)
        if not receiver.done():
            receiver.cancel()
        for task in [receiver, *others]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.following = False
        self.channel = None

    async def _receive(self) -> None:
        """Messages through the layer: from other processes with Redis, from this one otherwise."""
        assert self.channel is not None
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: retry; the pages repair on the next notice
                if "Timeout" in type(exc).__name__:
                    # redis-py ≥ 8 reads with a 5 s socket timeout, which an idle BZPOPMIN of the
                    # same length can reach first: nothing is wrong, receive again.
                    continue
                logger.warning("receiving from the channel layer failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if message.get("type") == STOP_TYPE:
                return
            if message.get("type") == MESSAGE_TYPE:
                self.deliver(str(message.get("group")), message.get("payload") or {})

    async def _refresh_groups(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, GROUP_REFRESH_SECONDS))
            for group in list(self.members):
                with contextlib.suppress(Exception):
                    await self.layer.group_add(group, self.channel)

    # --- the outbox follower (embedded mode) ------------------------------------------------------
    @staticmethod
    def _newest_id() -> int:
        return outbox_model().objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    def _read_outbox(self) -> tuple[list[tuple[int, str, Any]], bool]:
        self.reads += 1
        model = outbox_model()
        now = time.monotonic()
        self.gaps = {pk: seen for pk, seen in self.gaps.items() if now - seen < GAP_SECONDS}
        where = Q(pk__gt=self.cursor)
        if self.gaps:
            where |= Q(pk__in=list(self.gaps))
        rows = list(model.objects.filter(where).order_by("pk").values_list("pk", "group", "payload")[:FOLLOW_BATCH])
        expected = self.cursor + 1
        for pk, _group, _payload in rows:
            self.gaps.pop(pk, None)
            if pk > self.cursor:
                # Ids not seen may belong to transactions that commit later (PostgreSQL).
                if 0 < pk - expected <= FOLLOW_BATCH:
                    self.gaps.update(dict.fromkeys(range(expected, pk), now))
                expected = pk + 1
                self.cursor = pk
        return rows, len(rows) >= FOLLOW_BATCH

    async def _follow(self) -> None:
        while True:
            more = False
            try:
                rows, more = await database_sync_to_async(self._read_outbox)()
                for _pk, group, payload in rows:
                    if group in self.members:
                        self.deliver(group, payload or {})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not end live updates
                logger.warning("reading the live outbox failed; retrying", exc_info=True)
            if not more:
                await asyncio.sleep(FOLLOW_SECONDS)


# --- sockets -------------------------------------------------------------------------------------
class _Refuse(AsyncWebsocketConsumer):
    """Closes the handshake. Unlike Channels' own denier it opens no channel-layer receive: with
    Redis, every refused socket would otherwise park a BZPOPMIN whose cancellation can hang."""

    channel_layer_alias = NO_LAYER

    async def connect(self) -> None:
        await self.close()


class OriginCheck(OriginValidator):
    """Channels' allowed-hosts origin check (cross-site WebSocket hijacking), refusing with
    :class:`_Refuse`. A socket without an ``Origin`` header is refused too."""

    def __init__(self, application: Any) -> None:
        hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not hosts:
            hosts = ["localhost", "127.0.0.1", "[::1]"]
        super().__init__(application, hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origin = next((value for name, value in scope.get("headers", []) if name == b"origin"), None)
        try:
            parsed = urlparse(origin.decode("latin1")) if origin is not None else None
        except (UnicodeDecodeError, ValueError):
            parsed = None
        if parsed is not None and self.valid_origin(parsed):
            return await self.application(scope, receive, send)
        return await _Refuse()(scope, receive, send)


class LiveConsumer(AsyncJsonWebsocketConsumer, Member):
    """A page's socket: authorise, join, send what the page lacks, then what changes.

    Subclasses implement :meth:`authorize` (False: close 4404), :meth:`live_groups`, :meth:`start`
    (the first send), :meth:`on_live` (a batch of ``(group, payload)`` notices) and :meth:`resync`
    (everything again from the database, after a loss)."""

    user: Any
    #: Notices within this many seconds of the last batch wait and are handled together.
    min_interval: ClassVar[float] = 0.0
    #: No channel of its own: the hub receives for the whole process and hands messages over in
    #: memory (an alias that names no layer gives the socket none; Redis sees one receiver per process).
    channel_layer_alias = NO_LAYER

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return encode_json(content)

    async def connect(self) -> None:
        self.inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(INBOX_SIZE)
        self.overflowed = False
        self.joined: list[tuple[Hub, str]] = []
        self.pump: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.closing = False
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.query = parse_query(self.scope)
        if not await self.authorize():
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # Join before the first read: whatever changes after that read arrives as a notice.
        for group in self.live_groups():
            hub = Hub.current()
            await hub.join(group, self)
            self.joined.append((hub, group))
        await self.accept()
        async with self.lock:
            await self.start()
        self.pump = asyncio.create_task(self._pump())

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if getattr(self, "pump", None) is not None:
            self.pump.cancel()
        for hub, group in getattr(self, "joined", []):
            await hub.leave(group, self)
        self.joined = []
        await self.stopped()

    # --- to implement ---------------------------------------------------------------------------
    async def authorize(self) -> bool:
        return True

    def live_groups(self) -> list[str]:
        return []

    async def start(self) -> None:
        pass

    async def on_live(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        pass

    async def resync(self) -> None:
        await self.start()

    async def stopped(self) -> None:
        """Called on disconnect, after leaving the groups."""

    # --- delivery --------------------------------------------------------------------------------
    def deliver(self, group: str, payload: dict[str, Any]) -> None:
        try:
            self.inbox.put_nowait((group, payload))
        except asyncio.QueueFull:
            self.overflowed = True

    async def _pump(self) -> None:
        while True:
            batch = [await self.inbox.get()]
            if self.min_interval:
                await asyncio.sleep(self.min_interval)
            while not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            try:
                async with self.lock:
                    if self.closing:
                        return
                    if self.overflowed:
                        self.overflowed = False
                        await self.resync()
                    else:
                        await self.on_live(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the socket alive; the next notice repairs
                logger.warning("%s: a live update failed", type(self).__name__, exc_info=True)

    async def close_with(self, code: int, message: dict[str, Any] | None = None) -> None:
        if message is not None:
            await self.send_json(message)
        self.closing = True
        await self.close(code=code)


class StreamConsumer(LiveConsumer):
    """Sequence-numbered lines (contiguous ``seq`` from 1) after ``?after=N``, then live.

    Subclasses implement :meth:`read_lines` (a database read); live payloads carry ``lines``
    (``[{seq, text, time}]``) and/or ``last_log_seq``. ``sent_seq`` is the last line sent
    (``None``: not started yet)."""

    #: Lines per database read when catching up.
    backfill_batch: ClassVar[int] = 2000
    #: A longer line is cut here in the live view (the downloaded log keeps it whole).
    max_line_chars: ClassVar[int] = 64 * 1024
    line_message: ClassVar[dict[str, Any]] = {"type": "update"}

    sent_seq: int | None = None

    def read_lines(self, *, after: int, limit: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def query_after(self) -> int | None:
        values = self.query.get("after")
        if not values:
            return None
        try:
            return max(0, int(values[0]))
        except ValueError:
            return 0

    async def take_lines(self, lines: list[dict[str, Any]], last_seq: int | None) -> bool:
        """Send the live ``lines`` the page lacks, first reading from the database what the layer
        dropped (a batch that does not follow on) or did not carry (``last_seq`` beyond the batch).
        Returns True when a loss was repaired."""
        if self.sent_seq is None:
            return False
        repaired = False
        fresh = [line for line in lines if line["seq"] > self.sent_seq]
        contiguous = all(b["seq"] == a["seq"] + 1 for a, b in zip(fresh, fresh[1:], strict=False))
        if fresh and (fresh[0]["seq"] != self.sent_seq + 1 or not contiguous):
            await self.send_lines_from_db(upto=fresh[-1]["seq"])
            fresh = [line for line in lines if line["seq"] > self.sent_seq]
            repaired = True
        if fresh:
            await self.send_lines(fresh)
            self.sent_seq = fresh[-1]["seq"]
        if (last_seq or 0) > self.sent_seq:
            await self.send_lines_from_db(upto=last_seq or 0)
            repaired = True
        return repaired

    async def send_lines_from_db(self, *, upto: int | None = None) -> None:
        if self.sent_seq is None:
            return
        while upto is None or self.sent_seq < upto:
            lines = await database_sync_to_async(self.read_lines)(after=self.sent_seq, limit=self.backfill_batch)
            if not lines:
                return
            await self.send_lines(lines)
            self.sent_seq = lines[-1]["seq"]
            if len(lines) < self.backfill_batch and upto is None:
                return

    async def send_lines(self, lines: list[dict[str, Any]]) -> None:
        """Send lines in messages of at most ``MAX_MESSAGE_BYTES`` (one flush may hold thousands)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for line in lines:
            if len(line["text"]) > self.max_line_chars:
                line = {**line, "text": line["text"][: self.max_line_chars] + " … [cut here; download the full log]"}
            cost = len(line["text"]) + 64
            if batch and size + cost > MAX_MESSAGE_BYTES:
                await self.send_json({**self.line_message, "lines": batch})
                batch, size = [], 0
            batch.append(line)
            size += cost
        if batch:
            await self.send_json({**self.line_message, "lines": batch})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """``{"type": "resume"|"backfill", "after": N}``: the page holds every line up to N."""
        if not isinstance(content, dict) or content.get("type") not in ("resume", "backfill"):
            return
        try:
            after = max(0, int(content.get("after", 0)))
        except (TypeError, ValueError):
            return
        async with self.lock:
            self.sent_seq = after
            await self.resync()


def fingerprint(message: Any, volatile: frozenset[str]) -> str:
    """What decides whether a snapshot message is sent again: its content without the values that
    change on every read (the pages tick those locally)."""

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: stable(item) for key, item in value.items() if key not in volatile}
        if isinstance(value, list):
            return [stable(item) for item in value]
        return value

    return json.dumps(stable(message), sort_keys=True, default=str)


class SnapshotConsumer(LiveConsumer):
    """The current state of some rows: :meth:`snapshot` (messages keyed by ``type``) is sent on
    connect and after every notice, each message only when it changed (without ``volatile`` keys).
    ``{"type": "refresh"}`` from the page sends everything again."""

    volatile: ClassVar[frozenset[str]] = frozenset()

    async def snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
        """The messages to consider (``batch``: the notices being handled, None on connect or
        after a loss); None closes the socket (4401: the account is gone)."""
        raise NotImplementedError

    async def start(self) -> None:
        self.sent: dict[str, str] = {}
        await self.send_snapshot(None)

    async def resync(self) -> None:
        await self.send_snapshot(None)

    async def on_live(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        await self.send_snapshot(batch)

    async def send_snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> None:
        messages = await self.snapshot(batch)
        if messages is None:
            await self.close_with(CLOSE_UNAUTHENTICATED)
            return
        for message in messages:
            key = str(message.get("key") or message["type"])
            mark = fingerprint(message, self.volatile)
            if self.sent.get(key) != mark:
                self.sent[key] = mark
                await self.send_json({k: v for k, v in message.items() if k != "key"})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            async with self.lock:
                self.sent = {}
                await self.send_snapshot(None)


# --- snapshots shared by every socket of a process ------------------------------------------------
class SharedSnapshot(Member):
    """A snapshot that every socket of a process shares (one per hub and class).

    ``compute`` runs once per change for each kind of viewer (``viewer_key``: e.g. staff, or one
    user, and the page's language) among the subscribed sockets, however many sockets that is; the
    sockets then send it when it differs from what they sent. Notices on ``groups`` mark it stale;
    notices closer than ``min_interval`` are coalesced; ``refresh_seconds`` re-computes what changes
    with time alone. Each computation also re-reads the subscribed accounts, so a deactivated one is
    closed (4401) and a staff flag taken away takes effect."""

    topic: ClassVar[str]
    groups: ClassVar[tuple[str, ...]] = ()
    min_interval: ClassVar[float] = 0.5
    refresh_seconds: ClassVar[float | None] = 5.0

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subscribers: set[TopicConsumer] = set()
        self.revision = 0
        self.results: dict[Hashable, dict[str, Any]] = {}
        self.accounts: dict[int, tuple[bool, bool]] = {}
        self.stale = asyncio.Event()
        self.loop_task: asyncio.Task[None] | None = None
        self.computations = 0  #: computations so far (tests count them)

    # --- to implement ---------------------------------------------------------------------------
    def compute(self, *, user: Any, language: str) -> dict[str, Any]:
        """The message for one viewer (a database read; runs in the database thread)."""
        raise NotImplementedError

    def compute_all(self, viewers: dict[Hashable, tuple[Any, str]]) -> dict[Hashable, dict[str, Any]]:
        """The message for each kind of viewer; override to share work between them."""
        results = {}
        for key, (user, language) in viewers.items():
            with translation.override(language):
                results[key] = self.compute(user=user, language=language)
        return results

    @staticmethod
    def viewer_key(user: Any, language: str) -> Hashable:
        return (language, "staff" if user.is_staff else user.pk)

    # --- machinery -------------------------------------------------------------------------------
    @classmethod
    async def subscribe(cls, consumer: TopicConsumer) -> SharedSnapshot:
        hub = Hub.current()
        shared = hub.shared.get(cls)
        if shared is None:
            shared = hub.shared[cls] = cls(hub)
        if not shared.subscribers:
            for group in cls.groups:
                await hub.join(group, shared)
            shared.loop_task = asyncio.create_task(shared._loop())
        shared.subscribers.add(consumer)
        return shared

    async def unsubscribe(self, consumer: TopicConsumer) -> None:
        self.subscribers.discard(consumer)
        if self.subscribers:
            return
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.loop_task
            self.loop_task = None
        if self.hub.shared.get(type(self)) is self:
            del self.hub.shared[type(self)]
        for group in self.groups:
            await self.hub.leave(group, self)

    def deliver(self, group: str, payload: dict[str, Any]) -> None:
        self.stale.set()

    async def _loop(self) -> None:
        while True:
            try:
                if self.refresh_seconds:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stale.wait(), timeout=self.refresh_seconds)
                else:
                    await self.stale.wait()
                self.stale.clear()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not end live updates
                logger.warning("%s: computing the snapshot failed; retrying", type(self).__name__, exc_info=True)
            await asyncio.sleep(self.min_interval)

    def _viewers(self, consumers: Iterable[TopicConsumer]) -> dict[Hashable, tuple[Any, str]]:
        return {consumer.viewer_key: (consumer.user, consumer.language) for consumer in consumers}

    def _compute(self, viewers: dict[Hashable, tuple[Any, str]], user_ids: set[int]) -> tuple[Any, Any]:
        self.computations += 1
        accounts = {
            pk: (active, staff)
            for pk, active, staff in get_user_model().objects.filter(pk__in=user_ids).values_list(
                "pk", "is_active", "is_staff"
            )
        }
        return self.compute_all(viewers), accounts

    async def refresh(self) -> None:
        """Compute the snapshot again (once for each kind of viewer) and hand it to the sockets."""
        subscribers = list(self.subscribers)
        if not subscribers:
            return
        user_ids = {consumer.user.pk for consumer in subscribers}
        results, accounts = await database_sync_to_async(self._compute)(self._viewers(subscribers), user_ids)
        self.revision += 1
        self.results, self.accounts = results, accounts
        for consumer in list(self.subscribers):
            consumer.apply_account(accounts.get(consumer.user.pk, (False, False)))
            consumer.deliver(self.topic, {"revision": self.revision})

    async def result_for(self, consumer: TopicConsumer) -> dict[str, Any]:
        """The current message for this socket's kind of viewer (computed now if this kind of
        viewer was not among the subscribers at the last computation)."""
        key = consumer.viewer_key
        if key not in self.results:
            results = await database_sync_to_async(self.compute_all)(self._viewers([consumer]))
            self.results[key] = results[key]
        return self.results[key]


_TOPICS: dict[str, type[SharedSnapshot]] = {}


def register_topic(snapshot: type[SharedSnapshot]) -> type[SharedSnapshot]:
    """Offer a shared snapshot to :class:`TopicConsumer` sockets under its ``topic`` (an app lower in
    the layers serves a topic an app above it provides; usable as a decorator)."""
    _TOPICS[snapshot.topic] = snapshot
    return snapshot


class TopicConsumer(SnapshotConsumer):
    """A socket over shared snapshots (``?topics=a,b``, default :attr:`topics`; ``lang=`` the page's
    language). A deactivated account is closed with 4401."""

    topics: ClassVar[tuple[str, ...]] = ()

    async def authorize(self) -> bool:
        wanted = {part.strip() for value in self.query.get("topics", []) for part in value.split(",")}
        offered = [topic for topic in self.topics if topic in _TOPICS]
        self.chosen = [topic for topic in offered if topic in wanted] or offered
        self.language = query_language(self.query)
        self.active = True
        self.viewer_key = SharedSnapshot.viewer_key(self.user, self.language)
        return True

    async def start(self) -> None:
        self.shared = [await _TOPICS[topic].subscribe(self) for topic in self.chosen]
        await super().start()

    async def stopped(self) -> None:
        for shared in getattr(self, "shared", []):
            await shared.unsubscribe(self)
        self.shared = []

    def apply_account(self, account: tuple[bool, bool] | None) -> None:
        if account is None:
            return
        active, staff = account
        self.active = active
        if staff != self.user.is_staff:
            self.user.is_staff = staff
            self.viewer_key = SharedSnapshot.viewer_key(self.user, self.language)

    async def snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
        if not self.active:
            return None
        topics = {group for group, _payload in batch} if batch else set(self.chosen)
        return [await shared.result_for(self) for shared in self.shared if shared.topic in topics]



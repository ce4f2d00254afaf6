"""The page sockets of the live path (docs/live.md), and the origin check in front of them.

:class:`LiveConsumer` authorises at connect (anonymous: close 4401; more than
``FINETUNE_MAX_SOCKETS_PER_USER`` sockets of one user in this process: 4429; an object the user may
not see: close 4404, before joining anything), joins its groups on the process's
:class:`~core.live.hub.Hub`, then sends what the page lacks, in messages under
:data:`MAX_MESSAGE_BYTES`. Messages reach it through a bounded in-memory inbox; when the inbox
overflows the socket re-synchronises from the database (the layer, too, drops messages silently:
every consumer is built to repair a loss). What the page asks for that reads the database (a
backfill, a refresh) goes through a token bucket per socket (:data:`REQUEST_BURST`,
:data:`REQUEST_RATE`): requests beyond it are coalesced into one, never queued. The hub re-checks
the accounts of the open sockets and hands each its verdict (:meth:`LiveConsumer.account_changed`).

* :class:`StreamConsumer`: sequence-numbered lines (``?after=N``: backfill from the database, then
  live). A live batch that does not follow on from the last line sent, or a notice announcing a
  higher last sequence, is completed from the database first; duplicates are dropped.
* :class:`SnapshotConsumer`: the current state of some rows, sent on connect and after every
  change notice (notices that arrive together are coalesced); a message goes out only when its
  content changed. A missed notice is repaired by the next one, which always re-reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.security.websocket import OriginValidator
from django.conf import settings

from core.live.hub import Hub, Member
from core.live.wire import encode_json

logger = logging.getLogger(__name__)

#: Messages a socket may have waiting; beyond, it re-synchronises from the database instead.
INBOX_SIZE = 1000
#: Largest WebSocket message sent (daphne refuses more than 1 MiB).
MAX_MESSAGE_BYTES = 512 * 1024

#: A consumer with this alias has no channel-layer channel of its own (the alias names no layer).
NO_LAYER = "live-hub-only"

#: Requests of a page that read the database (``backfill``, ``refresh``, ``watch``): this many at
#: once, then :data:`REQUEST_RATE` per second; more are coalesced into the one waiting (the latest wins).
REQUEST_BURST = 4
REQUEST_RATE = 2.0
#: The most a stream socket reads and sends from the database for one catch-up (a connect, a backfill,
#: a repair); beyond, it says ``more`` and the page asks again (a request, so rate-limited).
BACKFILL_LINES = 2000
BACKFILL_BYTES = 2 * MAX_MESSAGE_BYTES
#: Lists a message may be split along when it would pass ``MAX_MESSAGE_BYTES``.
SPLIT_KEYS = ("lines", "metrics", "events")

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
#: Too many open sockets of one user in one process (``FINETUNE_MAX_SOCKETS_PER_USER``).
CLOSE_TOO_MANY = 4429


def parse_query(scope: dict[str, Any]) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def query_language(query: dict[str, list[str]]) -> str:
    """The page's language (``lang=``), for the words a socket renders."""
    codes = {code for code, _name in settings.LANGUAGES}
    values = query.get("lang")
    return values[0] if values and values[0] in codes else settings.LANGUAGE_CODE


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


class _Bucket:
    """A token bucket: ``burst`` requests at once, then ``rate`` per second."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> float:
        """0 when a request may go now (its token is taken), else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class LiveConsumer(AsyncJsonWebsocketConsumer, Member):
    """A page's socket: authorise, join, send what the page lacks, then what changes.

    Subclasses implement :meth:`authorize` (False: close 4404), :meth:`live_groups`, :meth:`start`
    (the first send), :meth:`on_live` (a batch of ``(group, payload)`` notices) and :meth:`resync`
    (everything again from the database, after a loss); :meth:`reauthorize` when the user's staff
    flag changed while the socket is open. What the page asks for that reads the database goes
    through :meth:`request` (rate-limited, coalesced)."""

    user: Any
    #: The session the socket was opened with (re-checked by the hub); None: not a session login.
    session_key: str | None = None
    closing: bool = False
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
        self.bucket = _Bucket(REQUEST_BURST, REQUEST_RATE)
        self.wanted: Callable[[], Awaitable[None]] | None = None
        self.serving: asyncio.Task[None] | None = None
        self.hub: Hub | None = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None) if session is not None else None
        self.query = parse_query(self.scope)
        hub = Hub.current()
        if not hub.register(self):
            # Accepted first: a refused handshake reaches the browser as 1006, without the code.
            await self.accept()
            await self.close_with(CLOSE_TOO_MANY)
            return
        self.hub = hub
        if not await self.authorize():
            self.release()
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # Join before the first read: whatever changes after that read arrives as a notice.
        for group in self.live_groups():
            await hub.join(group, self)
            self.joined.append((hub, group))
        await self.accept()
        async with self.lock:
            await self.start()
        self.pump = asyncio.create_task(self._pump())

    async def disconnect(self, code: int) -> None:
        self.closing = True
        self.release()
        for task in (getattr(self, "pump", None), getattr(self, "serving", None)):
            if task is not None:
                task.cancel()
        for hub, group in getattr(self, "joined", []):
            await hub.leave(group, self)
        self.joined = []
        await self.stopped()

    def release(self) -> None:
        """No longer count this socket for its user (closed, or closing)."""
        if getattr(self, "hub", None) is not None:
            self.hub.unregister(self)
            self.hub = None

    # --- to implement ---------------------------------------------------------------------------
    async def authorize(self) -> bool:
        return True

    async def reauthorize(self) -> bool:
        """Whether the socket may go on after the user's staff flag changed (``self.user`` has the
        new one); False closes it with 4404. By default yes: every read goes through ``for_user``."""
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

    # --- the account, re-checked by the hub ---------------------------------------------------------
    async def account_changed(self, *, allowed: bool, staff: bool) -> None:
        """The hub's verdict when the account changed: not allowed (deactivated, logged out) → 4401;
        a new staff flag → :meth:`reauthorize` (4404 when refused), then everything again."""
        async with self.lock:
            if self.closing:
                return
            if not allowed:
                await self.close_with(CLOSE_UNAUTHENTICATED)
                return
            if staff == bool(self.user.is_staff):
                return
            self.user.is_staff = staff
            if self.pump is None:  # not started yet: its first reads see the new flag
                return
            if not await self.reauthorize():
                await self.close_with(CLOSE_NOT_FOUND)
                return
            await self.resync()

    # --- requests from the page ----------------------------------------------------------------------
    def request(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` (a database read the page asked for) under the socket's lock, within the
        bucket: beyond it, ``action`` replaces whatever request is waiting (coalesced: the latest
        request wins; nothing queues up), and runs when the bucket allows."""
        self.wanted = action
        if self.serving is None or self.serving.done():
            self.serving = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while self.wanted is not None and not self.closing:
            wait = self.bucket.take()
            if wait:
                await asyncio.sleep(wait)
                continue
            action, self.wanted = self.wanted, None
            try:
                async with self.lock:
                    if self.closing:
                        return
                    await action()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the socket alive; the page may ask again
                logger.warning("%s: a request failed", type(self).__name__, exc_info=True)

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

    async def send_split(self, message: dict[str, Any], keys: Iterable[str] = SPLIT_KEYS) -> int:
        """Send ``message``; when it would pass :data:`MAX_MESSAGE_BYTES`, as several: its lists under
        ``keys`` in parts (each part with the message's ``type``), then the rest. Returns the bytes
        sent. (A single item larger than the cap still goes, alone.)"""
        text = encode_json(message)
        if len(text) <= MAX_MESSAGE_BYTES:
            await self.send(text_data=text)
            return len(text)
        head = {"type": message["type"]} if "type" in message else {}
        keys = [key for key in keys if key in message]
        sent = 0
        for key in keys:
            room = MAX_MESSAGE_BYTES - len(encode_json({**head, key: []}))
            part: list[Any] = []
            size = 0
            for item in message[key] or []:
                cost = len(encode_json(item)) + 2
                if part and size + cost > room:
                    sent += await self._send_text(encode_json({**head, key: part}))
                    part, size = [], 0
                part.append(item)
                size += cost
            if part:
                sent += await self._send_text(encode_json({**head, key: part}))
        rest = {key: value for key, value in message.items() if key not in keys}
        if rest.keys() - head.keys():
            sent += await self._send_text(encode_json(rest))
        return sent

    async def _send_text(self, text: str) -> int:
        await self.send(text_data=text)
        return len(text)

    async def close_with(self, code: int, message: dict[str, Any] | None = None) -> None:
        if message is not None:
            await self.send_json(message)
        self.closing = True
        self.release()
        await self.close(code=code)


class StreamConsumer(LiveConsumer):
    """Sequence-numbered lines (contiguous ``seq`` from 1) after ``?after=N``, then live.

    Subclasses implement :meth:`read_lines` (a database read); live payloads carry ``lines``
    (``[{seq, text, time}]``) and/or ``last_log_seq``. ``sent_seq`` is the last line sent
    (``None``: not started yet).

    One catch-up from the database (a connect, a ``backfill``, a repair) sends at most
    :data:`BACKFILL_LINES` lines or :data:`BACKFILL_BYTES`. When it stops short it sends
    ``{"lines": [the newest line], "more": true}``: the page, seeing the gap, asks for the rest
    (``{"type": "backfill", "after": N}``, rate-limited). Until then the socket is ``behind``: it reads
    no lines from the database on its own, and hands live lines on as they are (more gaps the page's
    requests fill)."""

    #: Lines per database read when catching up.
    backfill_batch: ClassVar[int] = 2000
    #: A longer line is cut here in the live view (the downloaded log keeps it whole).
    max_line_chars: ClassVar[int] = 64 * 1024
    line_message: ClassVar[dict[str, Any]] = {"type": "update"}

    sent_seq: int | None = None
    #: The last catch-up stopped short: the page asks for the rest.
    behind: bool = False

    def read_lines(self, *, after: int, limit: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def query_after(self, name: str = "after") -> int | None:
        """A cursor from the socket's query (``?after=N``): None when absent, 0 when malformed."""
        values = self.query.get(name)
        if not values:
            return None
        try:
            return max(0, int(values[0]))
        except ValueError:
            return 0

    async def take_lines(self, lines: list[dict[str, Any]], last_seq: int | None) -> bool:
        """Send the live ``lines`` the page lacks, first reading from the database what the layer
        dropped (a batch that does not follow on) or did not carry (``last_seq`` beyond the batch).
        Returns True when a loss was repaired (or its repair stopped short)."""
        if self.sent_seq is None:
            return False
        fresh = [line for line in lines if line["seq"] > self.sent_seq]
        contiguous = all(b["seq"] == a["seq"] + 1 for a, b in zip(fresh, fresh[1:], strict=False))
        follows = bool(fresh) and fresh[0]["seq"] == self.sent_seq + 1 and contiguous
        if self.behind:
            if not follows:
                if fresh:  # the page sees the gap and asks for what lies before
                    await self.send_lines(fresh)
                return False
            self.behind = False  # caught up: these follow on from the last line sent
        repaired = False
        if fresh and not follows:
            await self.send_lines_from_db(upto=fresh[-1]["seq"])
            if self.behind:
                return True
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
        """Send the lines after ``sent_seq`` (up to ``upto``) from the database, at most one
        catch-up's worth; nothing while the socket is ``behind`` (the page's requests bring those)."""
        if self.sent_seq is None or self.behind:
            return
        count = size = 0
        while upto is None or self.sent_seq < upto:
            limit = min(self.backfill_batch, BACKFILL_LINES - count)
            if limit <= 0 or size >= BACKFILL_BYTES:
                await self._send_more(upto)
                return
            lines = self._cut(await database_sync_to_async(self.read_lines)(after=self.sent_seq, limit=limit))
            if not lines:
                return
            taken: list[dict[str, Any]] = []
            for line in lines:
                cost = len(encode_json(line))
                if taken and size + cost > BACKFILL_BYTES:
                    break
                taken.append(line)
                size += cost
            await self.send_lines(taken)
            count += len(taken)
            self.sent_seq = taken[-1]["seq"]
            if len(taken) < len(lines):
                await self._send_more(upto)
                return
            if len(lines) < limit and upto is None:
                return

    async def _send_more(self, upto: int | None) -> None:
        """The catch-up stopped short: send the newest line known (at least two past the last line
        sent), whose gap makes the page ask for the rest. With no such line, the one line left goes."""
        assert self.sent_seq is not None
        after = max(self.sent_seq + 1, (upto or 0) - 1)
        probe = await database_sync_to_async(self.read_lines)(after=after, limit=1)
        if probe:
            self.behind = True
            await self.send_json({**self.line_message, "lines": self._cut(probe), "more": True})
            return
        last = await database_sync_to_async(self.read_lines)(after=self.sent_seq, limit=1)
        if last:
            await self.send_lines(last)
            self.sent_seq = last[-1]["seq"]

    def _cut(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        limit, note = self.max_line_chars, " … [cut here; download the full log]"
        return [{**line, "text": line["text"][:limit] + note} if len(line["text"]) > limit else line for line in lines]

    async def send_lines(self, lines: list[dict[str, Any]]) -> int:
        """Send lines in messages of at most ``MAX_MESSAGE_BYTES`` (one flush may hold thousands);
        returns the bytes sent."""
        return await self.send_split({**self.line_message, "lines": self._cut(lines)}, ("lines",))

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """``{"type": "resume"|"backfill", "after": N}``: the page holds every line up to N."""
        if not isinstance(content, dict) or content.get("type") not in ("resume", "backfill"):
            return
        try:
            after = max(0, int(content.get("after", 0)))
        except (TypeError, ValueError):
            return

        async def backfill() -> None:
            self.sent_seq = after
            self.behind = False
            await self.resync()

        self.request(backfill)


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
            self.request(self._refresh)

    async def _refresh(self) -> None:
        self.sent = {}
        await self.send_snapshot(None)

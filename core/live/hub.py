"""The read side of the live path: one :class:`Hub` per web process (per event loop) (docs/live.md).

The hub holds the process's sockets by group. It joins each group on the layer once, with one channel
of its own, however many sockets watch the group, and fans each message out to them in memory.
Without Redis it also runs the process's one outbox follower: it reads new outbox rows by id every
:data:`FOLLOW_SECONDS` and fans them out the same way. No socket reads the database on a timer of its
own.

It also counts the process's sockets per user (``FINETUNE_MAX_SOCKETS_PER_USER``), and every
``FINETUNE_SOCKET_RECHECK_SECONDS`` re-reads the accounts and sessions of all of them in one query
each (:func:`read_accounts`, :func:`account_verdict`): a deactivated account or a session logged out,
expired or no longer matching the password closes its sockets (4401); a staff flag taken away
re-authorises them (4404 when the object is no longer the user's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.db.models import Q
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from core.live.wire import MESSAGE_TYPE, SEND_TIMEOUT_SECONDS, cross_process_layer, outbox_model

if TYPE_CHECKING:  # the sockets and snapshots build on the hub; it only names them
    from core.live.sockets import LiveConsumer
    from core.live.topics import SharedSnapshot

logger = logging.getLogger(__name__)

#: Embedded mode: how often a web process's one follower reads new outbox rows.
FOLLOW_SECONDS = 0.1
#: Outbox rows read per query (a full batch is followed by the next read at once).
FOLLOW_BATCH = 500
#: A missing outbox id (a transaction that had not committed yet, on PostgreSQL) is looked for this long.
GAP_SECONDS = 10.0
#: Re-``group_add`` this often; channels-redis forgets group members after ``group_expiry`` (1 day).
GROUP_REFRESH_SECONDS = 3600.0
#: Accounts and sessions read per query when re-checking the sockets (a bound on query parameters).
RECHECK_CHUNK = 500
STOP_TYPE = "live.stop"


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
        # The process's sockets by user: the cap per user and the re-check of their accounts.
        self.sockets: dict[Any, set[LiveConsumer]] = {}
        self.recheck_task: asyncio.Task[None] | None = None
        self.recheck_stop = asyncio.Event()
        self.verdicts: set[asyncio.Task[None]] = set()
        self.rechecks = 0  #: account re-checks so far (tests count them)

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

    # --- the sockets of the process: a cap per user, and their accounts re-checked -----------------
    def register(self, socket: LiveConsumer) -> bool:
        """Count ``socket`` for its user; False (not counted) when the user has
        ``FINETUNE_MAX_SOCKETS_PER_USER`` sockets open in this process already."""
        mine = self.sockets.get(socket.user.pk, set())
        if len(mine) >= settings.FINETUNE_MAX_SOCKETS_PER_USER:
            return False
        mine.add(socket)
        self.sockets[socket.user.pk] = mine
        if self.recheck_task is None:
            self.recheck_stop = asyncio.Event()
            self.recheck_task = asyncio.create_task(self._recheck_loop(self.recheck_stop))
        return True

    def unregister(self, socket: LiveConsumer) -> None:
        mine = self.sockets.get(socket.user.pk)
        if mine is None or socket not in mine:
            return
        mine.discard(socket)
        if not mine:
            del self.sockets[socket.user.pk]
        if not self.sockets and self.recheck_task is not None:
            # Told to stop, not cancelled: it may be in the middle of its database read.
            self.recheck_stop.set()
            self.recheck_task = None

    async def _recheck_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=float(settings.FINETUNE_SOCKET_RECHECK_SECONDS))
            if stop.is_set():
                return
            try:
                await self.recheck()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup: the next round checks again
                logger.warning("re-checking the sockets' accounts failed; retrying", exc_info=True)

    async def recheck(self) -> None:
        """Re-read the account (and session) of every open socket of the process, in one query per
        table, and hand each socket whose account changed its verdict."""
        sockets = [socket for mine in self.sockets.values() for socket in mine if not socket.closing]
        if not sockets:
            return
        self.rechecks += 1
        accounts, sessions = await database_sync_to_async(read_accounts)(
            {socket.user.pk for socket in sockets}, {socket.session_key for socket in sockets if socket.session_key}
        )
        for socket in sockets:
            allowed, staff = account_verdict(socket.user.pk, socket.session_key, accounts, sessions)
            if allowed and staff == bool(socket.user.is_staff):
                continue
            task = asyncio.create_task(socket.account_changed(allowed=allowed, staff=staff))
            self.verdicts.add(task)
            task.add_done_callback(self.verdicts.discard)

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


# --- accounts and sessions, re-read for the sockets ---------------------------------------------------
class Account:
    """What a re-check needs of a user: whether it may still log in, its staff flag, and the
    session hashes its password allows (the current secret's and the fallbacks')."""

    __slots__ = ("active", "hashes", "staff")

    def __init__(self, user: Any) -> None:
        self.active = bool(getattr(user, "is_active", True))
        self.staff = bool(user.is_staff)
        self.hashes: list[str] | None = None
        if hasattr(user, "get_session_auth_hash"):
            self.hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]


def _chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    items = sorted(values, key=str)
    for start in range(0, len(items), RECHECK_CHUNK):
        yield items[start : start + RECHECK_CHUNK]


def read_accounts(user_ids: set[Any], session_keys: set[str]) -> tuple[dict[Any, Account], dict[str, dict[str, Any]]]:
    """The accounts of ``user_ids`` and the data of the sessions among ``session_keys`` that still
    exist and have not expired (one query per :data:`RECHECK_CHUNK` of each; a session engine that
    is not a database table is read one session at a time)."""
    accounts = {
        user.pk: Account(user)
        for chunk in _chunks(user_ids)
        for user in get_user_model()._default_manager.filter(pk__in=chunk)
    }
    store = import_module(settings.SESSION_ENGINE).SessionStore
    sessions: dict[str, dict[str, Any]] = {}
    if hasattr(store, "get_model_class"):  # db, cached_db: the table is the truth
        model, decoder = store.get_model_class(), store()
        for chunk in _chunks(session_keys):
            rows = model.objects.filter(session_key__in=chunk, expire_date__gt=timezone.now())
            for key, data in rows.values_list("session_key", "session_data"):
                sessions[key] = decoder.decode(data)
    else:
        for key in session_keys:
            data = store(session_key=key).load()
            if data:
                sessions[key] = data
    return accounts, sessions


def account_verdict(
    user_id: Any, session_key: str | None, accounts: dict[Any, Account], sessions: dict[str, dict[str, Any]]
) -> tuple[bool, bool]:
    """``(allowed, staff)`` for a socket of ``user_id`` opened with ``session_key``: allowed while the
    account is active and the session still logs this user in (as ``django.contrib.auth.get_user``
    decides: the session exists, names the user, and its hash matches the password)."""
    account = accounts.get(user_id)
    if account is None or not account.active:
        return False, False
    if session_key is None:
        return True, account.staff
    data = sessions.get(session_key)
    if data is None or str(data.get(SESSION_KEY)) != str(user_id):
        return False, account.staff
    if account.hashes is not None:
        stored = data.get(HASH_SESSION_KEY) or ""
        if not stored or not any(constant_time_compare(stored, good) for good in account.hashes):
            return False, account.staff
    return True, account.staff

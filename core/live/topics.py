"""Snapshots every socket of a process shares (docs/live.md): a :class:`SharedSnapshot` (the GPUs,
the queue) is computed once per change (and per kind of viewer), not per socket, and re-computed
every ``refresh_seconds`` for what changes with time alone (a host falling silent);
:class:`TopicConsumer` sockets subscribe to the topics the apps offer with :func:`register_topic`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.utils import translation

from core.live.hub import Hub, Member
from core.live.sockets import SnapshotConsumer, query_language

logger = logging.getLogger(__name__)


class SharedSnapshot(Member):
    """A snapshot that every socket of a process shares (one per hub and class).

    ``compute`` runs once per change for each kind of viewer (``viewer_key``: e.g. staff, or one
    user, and the page's language) among the subscribed sockets, however many sockets that is; the
    sockets then send it when it differs from what they sent. Notices on ``groups`` mark it stale;
    notices closer than ``min_interval`` are coalesced; ``refresh_seconds`` re-computes what changes
    with time alone. (The accounts of the subscribed sockets are re-checked by the hub, like every
    socket's: see :meth:`TopicConsumer.reauthorize`.)"""

    topic: ClassVar[str]
    groups: ClassVar[tuple[str, ...]] = ()
    min_interval: ClassVar[float] = 0.5
    refresh_seconds: ClassVar[float | None] = 5.0

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subscribers: set[TopicConsumer] = set()
        self.revision = 0
        self.results: dict[Hashable, dict[str, Any]] = {}
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

    def _compute(self, viewers: dict[Hashable, tuple[Any, str]]) -> dict[Hashable, dict[str, Any]]:
        self.computations += 1
        return self.compute_all(viewers)

    async def refresh(self) -> None:
        """Compute the snapshot again (once for each kind of viewer) and hand it to the sockets."""
        subscribers = list(self.subscribers)
        if not subscribers:
            return
        self.results = await database_sync_to_async(self._compute)(self._viewers(subscribers))
        self.revision += 1
        for consumer in list(self.subscribers):
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
    language). A deactivated account is closed with 4401 (by the hub's re-check, like every socket)."""

    topics: ClassVar[tuple[str, ...]] = ()

    async def authorize(self) -> bool:
        wanted = {part.strip() for value in self.query.get("topics", []) for part in value.split(",")}
        offered = [topic for topic in self.topics if topic in _TOPICS]
        self.chosen = [topic for topic in offered if topic in wanted] or offered
        self.language = query_language(self.query)
        self.viewer_key = SharedSnapshot.viewer_key(self.user, self.language)
        return True

    async def start(self) -> None:
        self.shared = [await _TOPICS[topic].subscribe(self) for topic in self.chosen]
        await super().start()

    async def stopped(self) -> None:
        for shared in getattr(self, "shared", []):
            await shared.unsubscribe(self)
        self.shared = []

    async def reauthorize(self) -> bool:
        # Another kind of viewer now (staff or not): the snapshot for that kind from now on.
        self.viewer_key = SharedSnapshot.viewer_key(self.user, self.language)
        return True

    async def snapshot(self, batch: list[tuple[str, dict[str, Any]]] | None) -> list[dict[str, Any]] | None:
        topics = {group for group, _payload in batch} if batch else set(self.chosen)
        return [await shared.result_for(self) for shared in self.shared if shared.topic in topics]

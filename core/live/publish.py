"""The write side of the live path (docs/live.md).

:func:`publish` (``group``, JSON-ready ``payload``) is the only entry point. With a cross-process
channel layer (Redis) it sends through the layer, after the surrounding transaction commits, from one
sender thread per process (one Redis connection, not one per call). With the embedded default (no
Redis: the in-memory layer cannot cross from the worker to daphne) it writes an outbox row
(:data:`~core.live.wire.OUTBOX_MODEL`) in the caller's transaction, so the notice exists exactly when
the data does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, ClassVar

from channels.layers import get_channel_layer
from django.db import transaction
from django.utils import timezone

from core.live.wire import MESSAGE_TYPE, SEND_TIMEOUT_SECONDS, cross_process_layer, finite, outbox_model

logger = logging.getLogger(__name__)

#: Outbox rows older than this are deleted (by the writers, at most every ``PRUNE_SECONDS``).
OUTBOX_KEEP_SECONDS = 300.0
PRUNE_SECONDS = 60.0


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
        model.objects.bulk_create([model(group=group, payload=finite(payload)) for group, payload in batch])
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
            await layer.group_send(group, {"type": MESSAGE_TYPE, "group": group, "payload": finite(payload)})

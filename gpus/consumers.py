"""The live GPUs and queue socket (``/ws/gpus/``) and the payloads the two pages render from.

The GPUs page (``/gpus/``) and the queue page (``/queue/``) render
:func:`gpus.selectors.gpu_overview` and :func:`gpus.selectors.queue_overview`; the socket sends the
same payloads, so a page that patches itself from a
message shows exactly what a reload would.

Visibility follows the selectors: a GPU's or CPU slot's holder is named (and linked) only to its
owner and to staff, like ``gpus.selectors.gpu_holder``; a waiting task of another user shows only
its place, priority, request and timing, like ``tasks.selectors.queue_entries``.

Delivery: the GPU agent rewrites the inventory rows every ``FINETUNE_GPU_REFRESH_SECONDS`` and the
dispatcher changes reservations in the database, so each socket re-reads the database every
``POLL_SECONDS`` and sends a topic (``gpus`` / ``queue``) only when its content changed. No channel
layer is involved, so it works the same with and without Redis. Values that change on every read
(seconds since a host was seen, a task's waited time, seconds until its estimated start) travel
with a message but do not trigger one: the pages tick them locally.

Query string: ``topics=gpus,queue`` (default both) and ``lang=<code>`` (the page's language, for
the words in the payload: notes, request labels, "another user's task").

Messages (JSON): ``{"type": "gpus", "hosts": [...]}`` and ``{"type": "queue", "entries": [...]}``.
A client may send ``{"type": "refresh"}`` to get both again. Anonymous sockets close with 4401.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import translation

from gpus import selectors

logger = logging.getLogger(__name__)

#: How often a socket re-reads the database (the agent refreshes the rows every 3 s by default).
POLL_SECONDS = 2.0
CLOSE_UNAUTHENTICATED = 4401
TOPICS = ("gpus", "queue")
#: Fields that change on every read; sent along with a real change only.
VOLATILE_FIELDS = frozenset({"last_seen", "seen_seconds_ago", "waited_seconds", "starts_in_seconds"})


def _stable(value: Any) -> Any:
    """``value`` without the volatile fields (what decides whether a message is sent)."""
    if isinstance(value, dict):
        return {key: _stable(item) for key, item in value.items() if key not in VOLATILE_FIELDS}
    if isinstance(value, list):
        return [_stable(item) for item in value]
    return value


def _parse_topics(raw: list[str] | None) -> tuple[str, ...]:
    if not raw:
        return TOPICS
    wanted = {part.strip() for value in raw for part in value.split(",")}
    return tuple(topic for topic in TOPICS if topic in wanted) or TOPICS


def _parse_language(raw: list[str] | None) -> str:
    codes = {code for code, _name in settings.LANGUAGES}
    if raw and raw[0] in codes:
        return raw[0]
    return settings.LANGUAGE_CODE


# --- the socket ----------------------------------------------------------------------------------
class GpuQueueConsumer(AsyncJsonWebsocketConsumer):
    """Snapshots of the GPUs and the queue for any logged-in user, re-sent when they change."""

    user: Any

    async def connect(self) -> None:
        self.loop_task: asyncio.Task[None] | None = None
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.topics = _parse_topics(query.get("topics"))
        self.language = _parse_language(query.get("lang"))
        self.sent: dict[str, str] = {}
        self.lock = asyncio.Lock()
        await self.accept()
        if await self._send_changes():
            self.loop_task = asyncio.create_task(self._loop())

    async def disconnect(self, code: int) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            self.sent.clear()
            await self._send_changes()

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, cls=DjangoJSONEncoder)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                if not await self._send_changes():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not end live updates
                logger.warning("GPU/queue snapshot failed; retrying", exc_info=True)

    def _read(self) -> dict[str, dict[str, Any]] | None:
        """Both snapshots, or None when the account was deactivated or deleted meanwhile. The user
        is re-read so that a staff flag taken away stops showing other users' holders."""
        user = get_user_model().objects.filter(pk=self.user.pk, is_active=True).first()
        if user is None:
            return None
        self.user = user
        messages: dict[str, dict[str, Any]] = {}
        with translation.override(self.language):
            if "gpus" in self.topics:
                messages["gpus"] = {"type": "gpus", "hosts": selectors.gpu_overview(user=user)}
            if "queue" in self.topics:
                messages["queue"] = {"type": "queue", "entries": selectors.queue_overview(user=user)}
        return messages

    async def _send_changes(self) -> bool:
        """Send the topics whose content changed; False (and the socket closed) when the account
        is gone."""
        async with self.lock:
            messages = await database_sync_to_async(self._read)()
            if messages is None:
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return False
            for topic, message in messages.items():
                fingerprint = json.dumps(_stable(message), cls=DjangoJSONEncoder, sort_keys=True)
                if self.sent.get(topic) != fingerprint:
                    self.sent[topic] = fingerprint
                    await self.send_json(message)
            return True

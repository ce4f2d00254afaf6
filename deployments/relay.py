"""What a gateway request holds while it is in flight: one of its user's slots and, for a streamed
answer, the relay that owns the connection to the model server (docs/security.md, M10).

:data:`slots` counts each user's requests in flight in this process
(``FINETUNE_GATEWAY_USER_CONCURRENCY``). :class:`Relay` is the body of a streamed answer: it relays
whole SSE events, cuts the answer past ``FINETUNE_GATEWAY_MAX_ANSWER_MB`` or when the caller lost
the right to it, counts the request's usage, and releases the slot and the connection however the
answer ends — including when the client leaves before the first byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from django.conf import settings
from django.db import DatabaseError

from deployments.services import deployment_record_usage

logger = logging.getLogger(__name__)

#: Whether the user may go on receiving (re-checked during a stream).
StillAllowed = Callable[[], Awaitable[bool]]

#: A streamed answer that the server never starts sending (its client left first) is closed after this.
START_DEADLINE_SECONDS = 30.0
#: One SSE event larger than this is a malformed stream.
MAX_EVENT_BYTES = 1 << 20


class _Slot:
    """One request in flight of one user; :meth:`release` is idempotent (and thread-safe: a
    finalizer may run it in another thread)."""

    def __init__(self, slots: UserSlots, user_id: int) -> None:
        self._slots, self.user_id, self.held = slots, user_id, True

    def release(self) -> None:
        self._slots.give(self)


class UserSlots:
    """How many gateway requests each user has in flight in this process (plain counters under a
    lock: daphne's loop, and the tests' loops in other threads)."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, user_id: int) -> _Slot | None:
        """A slot, or None when the user has ``FINETUNE_GATEWAY_USER_CONCURRENCY`` in flight."""
        with self._lock:
            held = self._counts.get(user_id, 0)
            if held >= settings.FINETUNE_GATEWAY_USER_CONCURRENCY:
                return None
            self._counts[user_id] = held + 1
        return _Slot(self, user_id)

    def give(self, slot: _Slot) -> None:
        with self._lock:
            if not slot.held:
                return
            slot.held = False
            held = self._counts.get(slot.user_id, 0) - 1
            if held > 0:
                self._counts[slot.user_id] = held
            else:
                self._counts.pop(slot.user_id, None)

    def held(self, user_id: int) -> int:
        with self._lock:
            return self._counts.get(user_id, 0)


slots = UserSlots()


# --- streamed answers ---------------------------------------------------------------------------------
def answer_usage(payload: Any) -> tuple[int, int] | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError, OverflowError):
        return None


class SseUsage:
    """Follows an SSE byte stream and keeps the last ``usage`` seen (swift puts the running totals
    in every chunk; OpenAI servers put them in a final chunk when asked)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.usage: tuple[int, int] | None = None
        self.chunks = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                body = line[5:].strip()
                if body == b"[DONE]":
                    self.done = True
                    continue
                self.chunks += 1
                try:
                    found = answer_usage(json.loads(body))
                except ValueError:
                    continue
                if found is not None:
                    self.usage = found
        if len(self._buffer) > MAX_EVENT_BYTES:  # a malformed stream must not grow memory without bound
            self._buffer = b""


def _event_end(data: bytes) -> int:
    """Where the last complete SSE event of ``data`` ends (0: none is complete)."""
    ends = [i + n for i, n in ((data.rfind(b"\n\n"), 2), (data.rfind(b"\r\n\r\n"), 4)) if i >= 0]
    return max(ends, default=0)


def _error_event(message: str, code: str, kind: str) -> bytes:
    """A final SSE event in the shape OpenAI clients raise as an error."""
    error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return f"data: {json.dumps(error)}\n\n".encode()


async def _read_one(chunks: Any) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


#: Closings started outside any request (the loop keeps only weak references to tasks).
_closing: set[asyncio.Task[None]] = set()


def _close_soon(relay: Relay) -> None:
    task = asyncio.get_running_loop().create_task(relay.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _close_if_unstarted(ref: weakref.ref[Relay]) -> None:
    relay = ref()
    if relay is not None and not relay.started and not relay.closed:
        logger.info("gateway: a streamed answer of deployment %s was never sent; closing it", relay.deployment_id)
        _close_soon(relay)


class Relay:
    """The body of a streamed answer: the model server's SSE events, relayed whole (so a cut is
    always between two events), and closed however it ends.

    It owns the upstream response and the user's slot. Both are released by :meth:`aclose`: at the
    end, when the client leaves while it waits (the cancellation reaches :meth:`__anext__`), and
    also when the server never starts reading it (the client left before the first byte: Django
    then drops the response unread, and :meth:`__del__` or the start deadline closes it). The answer
    is cut, with a final error event, past ``FINETUNE_GATEWAY_MAX_ANSWER_MB`` or when
    ``still_allowed`` (asked every ``FINETUNE_SOCKET_RECHECK_SECONDS``, also while the model is
    silent) says the token was revoked or the user deactivated.
    """

    def __init__(self, upstream: httpx.Response, *, deployment_id: int, slot: _Slot,
                 still_allowed: StillAllowed | None) -> None:
        self.upstream = upstream
        self.deployment_id = deployment_id
        self.started = False
        self._chunks = upstream.aiter_raw()
        self._slot = slot
        self._still_allowed = still_allowed
        self._seen = SseUsage()
        self._pending: asyncio.Task[bytes | None] | None = None
        self._held = b""  # what came after the last complete event
        self._sent = 0
        self._limit = settings.FINETUNE_GATEWAY_MAX_ANSWER_MB * 2**20
        self._every = settings.FINETUNE_SOCKET_RECHECK_SECONDS
        self._next_check = time.monotonic() + self._every
        self._final: bytes | None = None  # an error event to send before ending
        self._ending = False
        self._counted = False
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.call_later(START_DEADLINE_SECONDS, _close_if_unstarted, weakref.ref(self))
        self.closed = False  # last: __del__ acts only on a relay that was made whole

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        try:
            data = await self._next()
        except BaseException:  # the client left (CancelledError) or the relay broke: free everything
            await self.aclose()
            raise
        if data is None:
            await self.aclose()
            raise StopAsyncIteration
        return data

    async def _next(self) -> bytes | None:
        while True:
            if self._final is not None:
                final, self._final = self._final, None
                return final
            if self._ending:
                return None
            if self._still_allowed is not None and time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + self._every
                if not await self._allowed():
                    await self._cut("The API token was revoked or its user deactivated: the answer was stopped.",
                                    code="invalid_api_key", kind="authentication_error")
                    continue
            if self._pending is None:
                self._pending = asyncio.ensure_future(_read_one(self._chunks))
            wait = None if self._still_allowed is None else max(0.0, self._next_check - time.monotonic())
            done, _ = await asyncio.wait({self._pending}, timeout=wait)
            if not done:
                continue  # time for the next re-check; the read goes on
            pending, self._pending = self._pending, None
            try:
                data = pending.result()
            except httpx.HTTPError as exc:
                logger.warning("gateway: the stream of deployment %s broke off: %s", self.deployment_id, exc)
                await self._cut(f"The model server's answer broke off ({type(exc).__name__}).",
                                code="upstream_unavailable", kind="bad_gateway")
                continue
            if data is None:  # the end; anything after the last blank line goes too
                self._ending = True
                rest, self._held = self._held, b""
                if rest and self._sent + len(rest) <= self._limit:
                    return rest
                return None
            out = await self._complete_events(data)
            if out:
                return out

    async def _complete_events(self, data: bytes) -> bytes:
        self._held += data
        end = _event_end(self._held)
        if not end:
            if len(self._held) > MAX_EVENT_BYTES:
                await self._cut("The model server sent a malformed stream.", code="upstream_malformed",
                                kind="bad_gateway")
            return b""
        out, self._held = self._held[:end], self._held[end:]
        if self._sent + len(out) > self._limit:
            await self._cut(f"The answer was cut: it is larger than {settings.FINETUNE_GATEWAY_MAX_ANSWER_MB} MB "
                            "(FINETUNE_GATEWAY_MAX_ANSWER_MB).", code="answer_too_large", kind="bad_gateway")
            return b""
        self._sent += len(out)
        self._seen.feed(out)
        if self._seen.done:
            await self._count()  # before the client sees the end, so its next look at the counts is right
        return out

    async def _allowed(self) -> bool:
        assert self._still_allowed is not None
        try:
            return await self._still_allowed()
        except DatabaseError:  # a database hiccup does not cut answers; the next check decides
            logger.warning("gateway: could not re-check the token of a stream of deployment %s", self.deployment_id)
            return True

    async def _cut(self, message: str, *, code: str, kind: str) -> None:
        """End the answer with an error event, and stop the model server's work on it now."""
        self._final = _error_event(message, code, kind)
        self._ending = True
        self._held = b""
        await self._close_upstream()

    async def _close_upstream(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})
        await self.upstream.aclose()  # the model server sees the disconnect and stops generating

    async def _count(self) -> None:
        if not self._counted:
            self._counted = True
            prompt, completion = self._seen.usage or (0, self._seen.chunks)
            await deployment_record_usage(deployment_id=self.deployment_id, prompt_tokens=prompt,
                                          completion_tokens=completion)

    async def aclose(self) -> None:
        """Release the user's slot and the upstream connection, and count the request (once)."""
        if self.closed:
            return
        self.closed = True
        self._slot.release()
        self._deadline.cancel()
        try:
            await self._close_upstream()
        finally:
            await self._count()  # a stream that ended early (client gone, server died) still counts

    def __del__(self) -> None:
        # Dropped unread (the client left before the first byte): the slot now, the connection soon.
        if getattr(self, "closed", True):
            return
        self._slot.release()
        try:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(_close_soon, self)
        except RuntimeError:  # the loop is shutting down: nothing left to close on
            pass

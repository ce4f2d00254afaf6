"""Limits of the live sockets (security review L1, M7): a cap on sockets per user, rate-limited
requests, bounded catch-ups and messages, and accounts re-checked while a socket is open.

Driven through the real ASGI application (origin check + session auth), with the embedded default
and with ``REDIS_URL`` set alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as conf
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone

from core.live.hub import Hub, read_accounts
from core.live.sockets import (
    CLOSE_NOT_FOUND,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHENTICATED,
    MAX_MESSAGE_BYTES,
    REQUEST_BURST,
    REQUEST_RATE,
)
from finetune_platform.asgi import application
from tasks import consumers
from tasks.models import FinetuningTask, TaskEvent, TaskLogLine
from tasks.selectors import LIVE_EVENTS_ON_CONNECT
from tests.web.conftest import ORIGIN, session_cookie, ws_headers
from tests.web.test_consumers import collect, publish_lines, quiet

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def cookie_headers(session_key: str) -> list[tuple[bytes, bytes]]:
    return [ORIGIN, (b"cookie", f"{conf.SESSION_COOKIE_NAME}={session_key}".encode())]


async def open_socket(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await comm.connect()
    assert connected, code
    return comm


async def outputs(comm: WebsocketCommunicator, seconds: float) -> list[dict[str, Any]]:
    """Every ASGI message the application sends in the next ``seconds`` (texts and a close)."""
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        # receive_nothing does not cancel the application when it times out; receive_output would.
        if not await comm.receive_nothing(timeout=min(remaining, 0.2), interval=0.02):
            got.append(await comm.receive_output(timeout=5))
            if got[-1]["type"] == "websocket.close":
                break
    return got


async def close_code(comm: WebsocketCommunicator, timeout: float = 5.0) -> int | None:
    """The code the application closes the socket with within ``timeout`` (messages before are skipped)."""
    for output in await outputs(comm, timeout):
        if output["type"] == "websocket.close":
            return output.get("code")
    raise AssertionError(f"the socket stayed open for {timeout} s")


def texts(got: list[dict[str, Any]]) -> list[str]:
    return [output["text"] for output in got if output["type"] == "websocket.send"]


def store_lines(task_id: int, count: int, width: int = 20) -> None:
    task = FinetuningTask.objects.get(pk=task_id)
    now = timezone.now()
    TaskLogLine.objects.bulk_create(
        TaskLogLine(task=task, seq=seq, text=f"line {seq} ".ljust(width, "x"), created_at=now)
        for seq in range(1, count + 1)
    )
    FinetuningTask.objects.filter(pk=task_id).update(last_log_seq=count)


@pytest.fixture
def alice_task(alice: User, make_task: Callable[..., FinetuningTask]) -> FinetuningTask:
    return make_task(alice, max_steps=10)


@pytest.fixture
def recheck_fast(settings: Any) -> None:
    settings.FINETUNE_SOCKET_RECHECK_SECONDS = 0.2


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``after`` of every line read the task sockets make from the database, in order."""
    seen: list[int] = []
    original = consumers.TaskConsumer.read_lines

    def counting(self: consumers.TaskConsumer, *, after: int, limit: int) -> list[dict[str, Any]]:
        seen.append(after)
        return original(self, after=after, limit=limit)

    monkeypatch.setattr(consumers.TaskConsumer, "read_lines", counting)
    return seen


# --- sockets per user ----------------------------------------------------------------------------------
async def test_the_socket_past_the_cap_is_closed_with_4429(
    alice: User, bob: User, settings: Any
) -> None:
    settings.FINETUNE_MAX_SOCKETS_PER_USER = 2
    alice_headers = await database_sync_to_async(ws_headers)(alice)
    sockets = [await open_socket("/ws/tasks/", alice_headers) for _ in range(2)]
    try:
        # Accepted, then closed at once: the browser sees the code (a refused handshake is 1006).
        extra = await open_socket("/ws/tasks/", alice_headers)
        assert await close_code(extra, timeout=2) == CLOSE_TOO_MANY
        await extra.disconnect()
        # The cap is per user: bob is not affected.
        bobs = await open_socket("/ws/tasks/", await database_sync_to_async(ws_headers)(bob))
        assert await bobs.receive_nothing(timeout=0.3)
        await bobs.disconnect()
        # A socket closed frees its place.
        await sockets.pop().disconnect()
        sockets.append(await open_socket("/ws/tasks/", alice_headers))
        assert await sockets[-1].receive_nothing(timeout=0.3)
        assert len(Hub.current().sockets[alice.pk]) == 2
    finally:
        for comm in sockets:
            await comm.disconnect()
    assert alice.pk not in Hub.current().sockets


# --- requests from the page --------------------------------------------------------------------------
async def test_a_burst_of_backfill_requests_reads_the_database_a_bounded_number_of_times(
    alice: User, alice_task: FinetuningTask, reads: list[int]
) -> None:
    await database_sync_to_async(publish_lines)(alice_task.pk, ["a", "b", "c"])
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        await collect(comm, lambda g: len(g.seqs) >= 3)
        reads.clear()
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(99):
            await comm.send_json_to({"type": "backfill", "after": 0})
        await comm.send_json_to({"type": "backfill", "after": 2})  # the latest request wins
        got = await outputs(comm, 2.0)
        elapsed = loop.time() - began
        bound = REQUEST_BURST + REQUEST_RATE * elapsed + 1
        assert 1 <= len(reads) <= min(bound, 12), (reads, elapsed)
        messages = [json.loads(text) for text in texts(got)]
        with_lines = [m["lines"] for m in messages if m.get("lines")]
        assert len(with_lines) <= bound
        # Coalesced, not dropped: the last request was served, last.
        assert [line["seq"] for line in with_lines[-1]] == [3]
    finally:
        await comm.disconnect()


async def test_a_burst_of_refresh_requests_reads_the_database_a_bounded_number_of_times(
    alice: User, alice_task: FinetuningTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    original = consumers.TaskListConsumer._read

    def counting(self: consumers.TaskListConsumer, ids: set[int], check_new: bool) -> list[dict[str, Any]]:
        reads.append(len(ids))
        return original(self, ids, check_new)

    monkeypatch.setattr(consumers.TaskListConsumer, "_read", counting)
    comm = await open_socket(f"/ws/tasks/?ids={alice_task.pk}", await database_sync_to_async(ws_headers)(alice))
    try:
        await collect(comm, lambda g: bool(g.messages))
        reads.clear()
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(100):
            await comm.send_json_to({"type": "refresh"})
        got = await outputs(comm, 2.0)
        elapsed = loop.time() - began
        bound = REQUEST_BURST + REQUEST_RATE * elapsed + 1
        assert 1 <= len(reads) <= min(bound, 12), (reads, elapsed)
        assert 1 <= len(texts(got)) <= bound
    finally:
        await comm.disconnect()


# --- bounded catch-ups and messages --------------------------------------------------------------------
async def test_a_catch_up_is_bounded_and_the_page_asks_for_the_rest(
    alice: User, alice_task: FinetuningTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.live.sockets.BACKFILL_LINES", 50)
    await database_sync_to_async(store_lines)(alice_task.pk, 120)
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        held, asked_after = 0, []  # the page keeps the lines that follow on, and asks on a gap
        while held < 120:
            message = await comm.receive_json_from(timeout=5)
            for line in message.get("lines", []):
                if line["seq"] == held + 1:
                    held += 1
                elif line["seq"] > held + 1:  # the newest line, after a catch-up that stopped short
                    assert message.get("more") and line["seq"] == 120
                    asked_after.append(held)
                    await comm.send_json_to({"type": "backfill", "after": held})
                    break
        assert asked_after == [50, 100]
        rest = [json.loads(text) for text in texts(await outputs(comm, 0.5))]
        assert not any(m.get("more") for m in rest)
    finally:
        await comm.disconnect()


async def test_a_catch_up_one_line_short_sends_that_line_rather_than_a_marker(
    alice: User, alice_task: FinetuningTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.live.sockets.BACKFILL_LINES", 50)
    await database_sync_to_async(store_lines)(alice_task.pk, 51)  # no line two past the last: no gap to show
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        got = await collect(comm, lambda g: len(g.seqs) >= 51)
        later = await quiet(comm, 0.5)
        assert got.seqs + later.seqs == list(range(1, 52))
        assert not any(m.get("more") for m in got.messages + later.messages)
    finally:
        await comm.disconnect()


async def test_a_live_notice_reads_no_lines_while_the_page_is_catching_up(
    alice: User, alice_task: FinetuningTask, reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.live.sockets.BACKFILL_LINES", 50)
    await database_sync_to_async(store_lines)(alice_task.pk, 120)
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        await collect(comm, lambda g: any(m.get("more") for m in g.messages))
        reads.clear()
        await database_sync_to_async(publish_lines)(alice_task.pk, ["live 121"])
        got = await collect(comm, lambda g: 121 in g.seqs)
        assert reads == []  # handed on as it is; the page's own (rate-limited) request fills the gap
        assert got.seqs == [121]
    finally:
        await comm.disconnect()


async def test_events_and_lines_on_connect_come_in_messages_under_the_cap(
    alice: User, alice_task: FinetuningTask
) -> None:
    def store() -> None:
        TaskEvent.objects.bulk_create(
            TaskEvent(task=alice_task, kind="checkpoint", message=f"event {i} ".ljust(1000, "e")) for i in range(700)
        )
        store_lines(alice_task.pk, 1500, width=1000)

    await database_sync_to_async(store)()
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        sizes: list[int] = []
        events: list[str] = []
        seqs: list[int] = []
        # On connect a page gets the newest LIVE_EVENTS_ON_CONNECT events (older ones: the events API).
        newest = [str(i) for i in range(700 - LIVE_EVENTS_ON_CONNECT, 700)]
        while (len(events) < len(newest) or len(seqs) < 1500) and loop.time() < deadline:
            output = await comm.receive_output(timeout=5)
            sizes.append(len(output["text"]))
            message = json.loads(output["text"])
            events += [event["message"] for event in message.get("events", [])]
            if message.get("more"):  # a catch-up stopped short (by its bytes): ask for the rest
                await comm.send_json_to({"type": "backfill", "after": seqs[-1]})
                continue
            seqs += [line["seq"] for line in message.get("lines", [])]
        assert [e.split()[1] for e in events] == newest
        assert sorted(set(seqs)) == list(range(1, 1501))
        assert max(sizes) <= MAX_MESSAGE_BYTES and sum(sizes) > 2 * MAX_MESSAGE_BYTES
    finally:
        await comm.disconnect()


# --- accounts re-checked while a socket is open -------------------------------------------------------
async def test_deactivating_a_user_closes_their_sockets(
    alice: User, alice_task: FinetuningTask, recheck_fast: None
) -> None:
    headers = await database_sync_to_async(ws_headers)(alice)
    task_socket = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", headers)
    list_socket = await open_socket(f"/ws/tasks/?ids={alice_task.pk}", headers)
    queue_socket = await open_socket("/ws/queue/", headers)
    try:
        await collect(task_socket, lambda g: g.state.get("status") == "running")
        await database_sync_to_async(User.objects.filter(pk=alice.pk).update)(is_active=False)
        for comm in (task_socket, list_socket, queue_socket):
            assert await close_code(comm, timeout=3) == CLOSE_UNAUTHENTICATED
    finally:
        for comm in (task_socket, list_socket, queue_socket):
            await comm.disconnect()


async def test_logging_out_closes_the_sockets_of_that_session_only(
    alice: User, alice_task: FinetuningTask, recheck_fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds: list[tuple[int, int]] = []
    original = read_accounts

    def counting(user_ids: set[Any], session_keys: set[str]) -> Any:
        rounds.append((len(user_ids), len(session_keys)))
        return original(user_ids, session_keys)

    monkeypatch.setattr("core.live.hub.read_accounts", counting)
    laptop, phone = [await database_sync_to_async(session_cookie)(alice) for _ in range(2)]
    laptop_socket = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", cookie_headers(laptop))
    phone_socket = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", cookie_headers(phone))
    try:
        await asyncio.sleep(0.5)
        # One read for every socket of the process, each round (not one per socket).
        assert rounds and all(sizes == (1, 2) for sizes in rounds)
        await database_sync_to_async(SessionStore(session_key=laptop).delete)()  # what logout's flush does
        assert await close_code(laptop_socket, timeout=3) == CLOSE_UNAUTHENTICATED
        assert not [o for o in await outputs(phone_socket, 0.6) if o["type"] == "websocket.close"]
    finally:
        await laptop_socket.disconnect()
        await phone_socket.disconnect()


async def test_a_new_password_closes_the_sockets_of_older_sessions(
    alice: User, alice_task: FinetuningTask, recheck_fast: None
) -> None:
    comm = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", await database_sync_to_async(ws_headers)(alice))
    try:
        await collect(comm, lambda g: g.state.get("status") == "running")

        def change_password() -> None:  # e.g. by staff in the admin: the session's hash no longer matches
            user = User.objects.get(pk=alice.pk)
            user.set_password("a-new-pass-456")
            user.save()

        await database_sync_to_async(change_password)()
        assert await close_code(comm, timeout=3) == CLOSE_UNAUTHENTICATED
    finally:
        await comm.disconnect()


async def test_removing_staff_closes_a_socket_on_another_users_task_with_4404(
    alice: User, staff: User, alice_task: FinetuningTask, make_task: Callable[..., FinetuningTask],
    recheck_fast: None,
) -> None:
    own = await database_sync_to_async(make_task)(staff, name="olgas")
    headers = await database_sync_to_async(ws_headers)(staff)
    others = await open_socket(f"/ws/tasks/{alice_task.pk}/?after=0", headers)
    mine = await open_socket(f"/ws/tasks/{own.pk}/?after=0", headers)
    rows = await open_socket(f"/ws/tasks/?ids={alice_task.pk},{own.pk}", headers)
    try:
        await collect(others, lambda g: g.state.get("id") == alice_task.pk)
        await collect(rows, lambda g: len(g.messages) >= 2)
        await database_sync_to_async(User.objects.filter(pk=staff.pk).update)(is_staff=False)
        assert await close_code(others, timeout=3) == CLOSE_NOT_FOUND
        # Their own task's socket stays; the list drops the row that is no longer theirs.
        gone = await collect(rows, lambda g: any(m["type"] == "gone" for m in g.messages), timeout=3)
        assert [m for m in gone.messages if m["type"] == "gone"] == [{"type": "gone", "ids": [alice_task.pk]}]
        assert not [o for o in await outputs(mine, 0.6) if o["type"] == "websocket.close"]
    finally:
        for comm in (others, mine, rows):
            await comm.disconnect()

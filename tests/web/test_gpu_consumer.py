"""The GPUs and queue socket (``/ws/gpus/``), driven through the real ASGI application (origin check
+ session auth). It follows the database, so it behaves the same with and without REDIS_URL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User

from finetune_platform.asgi import application
from gpus import consumers
from gpus.models import Gpu, Host, Reservation
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host
from tests.web.conftest import ws_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


async def receive(comm: WebsocketCommunicator, kind: str, timeout: float = 8.0,
                  until: Callable[[dict[str, Any]], bool] = lambda m: True) -> dict[str, Any]:
    """The first message of type ``kind`` (that satisfies ``until``) within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: list[dict[str, Any]] = []
    while (remaining := deadline - loop.time()) > 0:
        # receive_nothing does not cancel the application when it times out; receive_json_from would.
        if await comm.receive_nothing(timeout=min(remaining, 0.2), interval=0.02):
            continue
        message = await comm.receive_json_from(timeout=5)
        seen.append(message)
        if message.get("type") == kind and until(message):
            return message
    raise AssertionError(f"no {kind!r} message within {timeout} s; got {seen}")


async def quiet(comm: WebsocketCommunicator, seconds: float) -> list[dict[str, Any]]:
    """Every message of the next ``seconds``."""
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        if not await comm.receive_nothing(timeout=min(remaining, 0.2), interval=0.02):
            got.append(await comm.receive_json_from(timeout=5))
    return got


async def connect(user: User | None, query: str = "") -> WebsocketCommunicator:
    headers = await database_sync_to_async(ws_headers)(user)
    comm = WebsocketCommunicator(application, "/ws/gpus/" + (f"?{query}" if query else ""), headers=headers)
    connected, _ = await comm.connect()
    assert connected
    return comm


def gpus_of(message: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {gpu["id"]: gpu for host in message["hosts"] for gpu in host["gpus"]}


@pytest.fixture
def inventory(alice: User, make_task: Callable[..., FinetuningTask]) -> dict[str, Any]:
    """A live host with two GPUs; alice's running task holds GPU 1 and alice has a waiting task."""
    host = announce_host("gpu-a", "2x80", cpu=1)
    running = make_task(alice, name="alice-secret-run", gpu_config={"count": 1})
    Reservation.objects.create(host=host, gpu=host.gpus.get(index=1), run=running.run)
    waiting = make_task(alice, name="alice-waiting", status=TaskStatus.PENDING, gpu_config={"count": 2})
    return {"host": host, "running": running, "waiting": waiting, "gpu0": host.gpus.get(index=0),
            "gpu1": host.gpus.get(index=1)}


async def test_anonymous_sockets_are_refused_with_4401() -> None:
    comm = WebsocketCommunicator(application, "/ws/gpus/", headers=ws_headers(None))
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_a_foreign_origin_is_refused(alice: User) -> None:
    headers = await database_sync_to_async(ws_headers)(alice, (b"origin", b"http://evil.example"))
    connected, _ = await WebsocketCommunicator(application, "/ws/gpus/", headers=headers).connect()
    assert not connected


async def test_a_logged_in_user_receives_a_snapshot_of_the_gpus_and_the_queue(
    alice: User, inventory: dict[str, Any]
) -> None:
    comm = await connect(alice)
    try:
        gpus = await receive(comm, "gpus")
        queue = await receive(comm, "queue")
    finally:
        await comm.disconnect()
    [host] = gpus["hosts"]
    assert host["name"] == "gpu-a" and host["live"] and host["backend"] == "fake"
    assert [slot["holder"] for slot in host["cpu_slots"]] == [None]
    by_id = gpus_of(gpus)
    assert by_id[inventory["gpu0"].pk]["state"] == "free"
    held = by_id[inventory["gpu1"].pk]
    assert held["state"] == "reserved" and held["memory_total_gb"] == 80.0
    assert held["holder"]["name"] == "alice-secret-run"
    assert held["holder"]["url"] == f"/tasks/{inventory['running'].pk}/"
    [entry] = queue["entries"]
    assert entry["name"] == "alice-waiting" and entry["id"] == inventory["waiting"].pk and entry["position"] == 1
    assert entry["request_label"] == "2 × GPU"


async def test_bobs_snapshot_hides_alices_task(bob: User, inventory: dict[str, Any]) -> None:
    comm = await connect(bob)
    try:
        gpus = await receive(comm, "gpus")
        queue = await receive(comm, "queue")
    finally:
        await comm.disconnect()
    holder = gpus_of(gpus)[inventory["gpu1"].pk]["holder"]
    assert holder == {"kind": "task", "id": None, "name": "another user's task", "status": "running",
                      "status_label": "Running", "url": None}
    [entry] = queue["entries"]
    assert entry["name"] == "another user's task" and entry["id"] is None and entry["owner"] is None
    assert entry["url"] is None and entry["visible"] is False and entry["mine"] is False
    assert entry["priority"] == 5 and entry["request"]["count"] == 2
    for message in (gpus, queue):
        text = str(message)
        assert "alice" not in text and f"/tasks/{inventory['running'].pk}/" not in text


async def test_a_change_in_a_gpu_row_is_pushed_within_a_few_seconds(
    alice: User, inventory: dict[str, Any]
) -> None:
    comm = await connect(alice, "topics=gpus")
    try:
        await receive(comm, "gpus")
        gpu = inventory["gpu0"]
        await database_sync_to_async(Gpu.objects.filter(pk=gpu.pk).update)(memory_used_mb=20 * 1024,
                                                                             utilization_pct=88)
        loop = asyncio.get_running_loop()
        started = loop.time()
        message = await receive(comm, "gpus", timeout=consumers.POLL_SECONDS + 4,
                                until=lambda m: gpus_of(m)[gpu.pk]["memory_used_mb"] == 20 * 1024)
        assert loop.time() - started <= consumers.POLL_SECONDS + 4
        pushed = gpus_of(message)[gpu.pk]
        assert pushed["memory_used_gb"] == 20.0 and pushed["memory_pct"] == 25.0 and pushed["utilization_pct"] == 88
    finally:
        await comm.disconnect()


async def test_nothing_is_sent_while_only_the_last_seen_time_moves(
    alice: User, inventory: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "POLL_SECONDS", 0.2)
    comm = await connect(alice)
    try:
        await receive(comm, "gpus")
        await receive(comm, "queue")
        # The agent re-announces the same inventory (only last_seen_at and updated_at change).
        await database_sync_to_async(announce_host)("gpu-a", "2x80", 1)
        assert await quiet(comm, 1.5) == []
        # A real change still goes out.
        await database_sync_to_async(Host.objects.filter(name="gpu-a").update)(gpu_error="NVML: lost GPU 1")
        message = await receive(comm, "gpus", timeout=3)
        assert message["hosts"][0]["error"] == "NVML: lost GPU 1"
    finally:
        await comm.disconnect()


async def test_a_queue_change_is_pushed(alice: User, bob: User, inventory: dict[str, Any],
                                        make_task: Callable[..., FinetuningTask]) -> None:
    comm = await connect(bob, "topics=queue")
    try:
        first = await receive(comm, "queue")
        assert len(first["entries"]) == 1
        await database_sync_to_async(make_task)(bob, name="bobs-task", status=TaskStatus.PENDING, priority=9,
                                                gpu_config={"cpu": True})
        await database_sync_to_async(FinetuningTask.objects.filter(pk=inventory["waiting"].pk).update)(held=True)
        message = await receive(comm, "queue", until=lambda m: len(m["entries"]) == 2 and m["entries"][1]["held"])
        names = [entry["name"] for entry in message["entries"]]
        assert names == ["bobs-task", "another user's task"]
        assert message["entries"][0]["request_label"] == "a CPU slot" and message["entries"][0]["mine"]
        assert message["entries"][1]["note"] == "on hold"
    finally:
        await comm.disconnect()


async def test_the_topics_and_the_language_are_chosen_by_the_page(alice: User, inventory: dict[str, Any]) -> None:
    comm = await connect(alice, "topics=gpus&lang=zh-hans")
    try:
        gpus = await receive(comm, "gpus")
        assert gpus_of(gpus)[inventory["gpu1"].pk]["holder"]["status_label"] == "运行中"  # "Running"
        assert all(m["type"] == "gpus" for m in await quiet(comm, 0.5))
    finally:
        await comm.disconnect()


async def test_a_refresh_message_resends_the_snapshot(alice: User, inventory: dict[str, Any]) -> None:
    comm = await connect(alice, "topics=queue")
    try:
        first = await receive(comm, "queue")
        await comm.send_json_to({"type": "refresh"})
        again = await receive(comm, "queue", timeout=3)
        assert again["entries"][0]["id"] == first["entries"][0]["id"]
    finally:
        await comm.disconnect()


async def test_a_deactivated_account_is_disconnected(alice: User, inventory: dict[str, Any], settings: Any) -> None:
    settings.FINETUNE_SOCKET_RECHECK_SECONDS = 0.2  # the hub re-checks every socket's account this often
    comm = await connect(alice, "topics=gpus")
    await receive(comm, "gpus")
    await database_sync_to_async(User.objects.filter(pk=alice.pk).update)(is_active=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        output = await comm.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            assert output["code"] == 4401
            break
    else:
        raise AssertionError("the socket stayed open")
    await comm.disconnect()

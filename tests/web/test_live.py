"""The one live path (``core.live``): the deployment sockets, repairs after a lost notice, one outbox
follower per process, and the queue computed once per change for every socket.

They pass with the embedded default and with ``REDIS_URL`` set (the follower tests only apply to the
embedded mode, where there is a follower).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from core.live.hub import FOLLOW_SECONDS, Hub
from core.live.publish import publish
from core.live.wire import cross_process_layer, outbox_model
from deployments.logs import DeploymentLog, deployment_group
from deployments.models import Deployment, DeploymentLogLine, DeploymentStatus
from finetune_platform.asgi import application
from tasks import consumers as task_consumers
from tasks.models import FinetuningTask, TaskStatus
from tasks.publisher import TASKS_GROUP, broadcast
from tests.web.conftest import ws_headers
from tests.web.test_consumers import collect, publish_lines, quiet, store_lines_silently

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

embedded_only = pytest.mark.skipif("cross_process_layer()", reason="the outbox follower is the embedded mode's")


async def open_socket(path: str, user: User | None) -> WebsocketCommunicator:
    headers = await database_sync_to_async(ws_headers)(user)
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await comm.connect()
    assert connected, code
    return comm


async def messages_until(comm: WebsocketCommunicator, done: Callable[[list[dict[str, Any]]], bool],
                         timeout: float = 8.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(got):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"not received within {timeout} s; got {got}")
        if not await comm.receive_nothing(timeout=min(remaining, 0.2), interval=0.02):
            got.append(await comm.receive_json_from(timeout=5))
    return got


def lines_of(messages: list[dict[str, Any]]) -> list[int]:
    return [line["seq"] for m in messages if m["type"] == "lines" for line in m["lines"]]


def states_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["state"] for m in messages if m["type"] == "state"]


@pytest.fixture
def deployment(alice: User) -> Deployment:
    return Deployment.objects.create(owner=alice, name="colors-chat", status=DeploymentStatus.STARTING,
                                     host="gpu-a", served_model_name="colors")


def write_log(deployment_id: int, texts: list[str]) -> None:
    """What the deployment runner does: a batch of lines through the one log writer."""
    log = DeploymentLog(Deployment.objects.get(pk=deployment_id))
    log.add(texts)
    log.flush(force=True)


# --- the deployment page -------------------------------------------------------------------------
async def test_the_deployment_page_gets_its_state_and_log_lines_through_the_socket(
    alice: User, deployment: Deployment
) -> None:
    await database_sync_to_async(write_log)(deployment.pk, ["loading", "loaded"])
    comm = await open_socket(f"/ws/deployments/{deployment.pk}/?after=0", alice)
    try:
        got = await messages_until(comm, lambda g: states_of(g) and lines_of(g) == [1, 2])
        state = states_of(got)[0]
        assert state["status"] == "starting" and state["is_active"] and state["last_log_seq"] == 2
        html = next(m["html"] for m in got if m["type"] == "state")
        assert 'data-live-part="status"' in html["status"] and "badge-starting" in html["status"]
        assert "gpu-a" in html["facts"]

        def ready() -> None:  # the runner: the status, then its platform line
            Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.RUNNING, port=8123)
            log = DeploymentLog(Deployment.objects.get(pk=deployment.pk))
            log.note("Ready: serving 'colors' on 127.0.0.1:8123")

        await database_sync_to_async(ready)()
        got = await messages_until(comm, lambda g: lines_of(g) == [3] and states_of(g))
        assert states_of(got)[-1]["status"] == "running" and "badge-running" in got[-1]["html"]["status"] or any(
            "badge-running" in m["html"]["status"] for m in got if m["type"] == "state")
        assert "127.0.0.1:8123" in next(m for m in got if m["type"] == "state")["html"]["facts"]
        await database_sync_to_async(write_log)(deployment.pk, ["GET /v1/models 200"])
        got = await messages_until(comm, lambda g: lines_of(g) == [4])
        assert not states_of(got)  # a line of swift's alone does not re-read the state
    finally:
        await comm.disconnect()


async def test_the_deployment_socket_resumes_after_the_last_line_the_page_holds(
    alice: User, deployment: Deployment
) -> None:
    await database_sync_to_async(write_log)(deployment.pk, [f"line {i}" for i in range(1, 6)])
    comm = await open_socket(f"/ws/deployments/{deployment.pk}/?after=3", alice)
    try:
        got = await messages_until(comm, lambda g: lines_of(g) == [4, 5])
        got += await quiet_messages(comm, 0.5)
        assert lines_of(got) == [4, 5]
    finally:
        await comm.disconnect()


async def quiet_messages(comm: WebsocketCommunicator, seconds: float) -> list[dict[str, Any]]:
    return (await quiet(comm, seconds)).messages


async def test_bob_is_refused_alices_deployment_with_4404_and_joins_no_group(bob: User, deployment: Deployment) -> None:
    headers = await database_sync_to_async(ws_headers)(bob)
    comm = WebsocketCommunicator(application, f"/ws/deployments/{deployment.pk}/", headers=headers)
    connected, code = await comm.connect()
    assert not connected and code == 4404
    assert deployment_group(deployment.pk) not in Hub.current().members
    layer = get_channel_layer()
    if not cross_process_layer():
        assert not layer.groups.get(deployment_group(deployment.pk))


async def test_anonymous_deployment_sockets_are_refused_with_4401(deployment: Deployment) -> None:
    for path in (f"/ws/deployments/{deployment.pk}/", "/ws/deployments/"):
        comm = WebsocketCommunicator(application, path, headers=ws_headers(None))
        connected, code = await comm.connect()
        assert not connected and code == 4401


async def test_a_dropped_deployment_log_notice_is_repaired_from_the_database(
    alice: User, deployment: Deployment
) -> None:
    comm = await open_socket(f"/ws/deployments/{deployment.pk}/?after=0", alice)
    try:
        await messages_until(comm, lambda g: bool(states_of(g)))

        def lines_without_notice() -> None:  # stored, but their notice was lost
            rows = [DeploymentLogLine(deployment_id=deployment.pk, seq=i, text=f"lost {i}", created_at=timezone.now())
                    for i in (1, 2)]
            DeploymentLogLine.objects.bulk_create(rows)
            Deployment.objects.filter(pk=deployment.pk).update(last_log_seq=2)

        await database_sync_to_async(lines_without_notice)()
        assert not lines_of(await quiet_messages(comm, 0.5))  # nobody polls
        await database_sync_to_async(write_log)(deployment.pk, ["after the loss"])
        got = await messages_until(comm, lambda g: len(lines_of(g)) >= 3)
        got += await quiet_messages(comm, 0.5)
        assert lines_of(got) == [1, 2, 3]
        texts = [line["text"] for m in got if m["type"] == "lines" for line in m["lines"]]
        assert texts == ["lost 1", "lost 2", "after the loss"]
    finally:
        await comm.disconnect()


async def test_the_deployment_list_re_renders_a_row_when_its_deployment_changes(
    alice: User, deployment: Deployment
) -> None:
    comm = await open_socket(f"/ws/deployments/?ids={deployment.pk}", alice)
    try:
        first = await messages_until(comm, lambda g: bool(g))
        assert first[0]["type"] == "deployments" and "badge-starting" in first[0]["deployments"][0]["html"]

        def stopped() -> None:
            Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.STOPPED)
            DeploymentLog(Deployment.objects.get(pk=deployment.pk)).note("Stopped")

        await database_sync_to_async(stopped)()
        got = await messages_until(comm, lambda g: bool(g))
        assert got[0]["deployments"][0]["status"] == "stopped" and "badge-stopped" in got[0]["deployments"][0]["html"]
    finally:
        await comm.disconnect()


# --- repairs ---------------------------------------------------------------------------------------
async def test_a_snapshot_socket_gets_a_fresh_snapshot_after_a_missed_notice(
    alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    task = await database_sync_to_async(make_task)(alice, max_steps=10)
    comm = await open_socket(f"/ws/tasks/?ids={task.pk}", alice)
    try:
        first = await messages_until(comm, lambda g: bool(g))
        assert first[0]["tasks"][0]["progress"] == 0.0
        # A change whose notice was lost: nothing arrives (no socket polls).
        await database_sync_to_async(FinetuningTask.objects.filter(pk=task.pk).update)(progress=40.0, current_step=4)
        assert await comm.receive_nothing(timeout=1.0)
        # The next notice, about anything of this task, brings the state of now: both changes.
        await database_sync_to_async(FinetuningTask.objects.filter(pk=task.pk).update)(loss=1.5)
        await database_sync_to_async(broadcast)(task, {"loss": 1.5})
        got = await messages_until(comm, lambda g: bool(g))
        row = got[0]["tasks"][0]
        assert row["progress"] == 40.0 and row["current_step"] == 4 and row["loss"] == 1.5
        assert "4/10" in row["html"]
    finally:
        await comm.disconnect()


async def test_an_overflowing_inbox_resynchronises_the_stream_from_the_database(
    alice: User, make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.live.sockets.INBOX_SIZE", 1)
    task = await database_sync_to_async(make_task)(alice, max_steps=10)
    comm = await open_socket(f"/ws/tasks/{task.pk}/?after=0", alice)
    try:
        await collect(comm, lambda g: g.state.get("status") == "running")
        [consumer] = Hub.current().members[f"task.{task.pk}"]
        await database_sync_to_async(store_lines_silently)(task.pk, 3)
        # Three notices at once into an inbox for one: two are dropped, the socket reads the database.
        for seq in (1, 2, 3):
            consumer.deliver(f"task.{task.pk}", {"lines": [{"seq": seq, "text": f"quiet {seq}", "time": None}]})
        got = await collect(comm, lambda g: len(g.seqs) >= 3)
        got.seqs += (await quiet(comm, 0.5)).seqs
        assert got.seqs == [1, 2, 3]
    finally:
        await comm.disconnect()


# --- one follower per process -----------------------------------------------------------------------
@embedded_only
async def test_many_sockets_on_one_task_share_one_database_follower(
    alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    task = await database_sync_to_async(make_task)(alice, max_steps=10)
    other = await database_sync_to_async(make_task)(alice, name="other")
    sockets = [await open_socket(f"/ws/tasks/{task.pk}/?after=0", alice) for _ in range(8)]
    sockets.append(await open_socket(f"/ws/tasks/{other.pk}/?after=0", alice))
    try:
        hub = Hub.current()
        assert hub.following and len(hub.members[f"task.{task.pk}"]) == 8
        before = hub.reads
        await asyncio.sleep(1.0)
        reads = hub.reads - before
        # One read every FOLLOW_SECONDS for the whole process, not one per socket or per task.
        assert 1 <= reads <= 1.5 / FOLLOW_SECONDS
        await database_sync_to_async(publish_lines)(task.pk, ["to everyone"])
        for comm in sockets[:8]:
            got = await collect(comm, lambda g: g.texts == ["to everyone"])
            assert got.seqs == [1]
    finally:
        for comm in sockets:
            await comm.disconnect()
    assert not hub.members and not hub.following  # the last socket gone, the follower stops


@embedded_only
def test_a_notice_is_written_with_the_change_it_announces(transactional_db: None) -> None:
    model = outbox_model()
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("task.1", {"status": "running"})
        raise RuntimeError("the change is rolled back")
    assert not model.objects.exists()
    with transaction.atomic():
        publish("task.1", {"status": "running"})
    assert list(model.objects.values_list("group", "payload")) == [("task.1", {"status": "running"})]


# --- the queue: once per change ---------------------------------------------------------------------
async def test_the_queue_is_computed_once_per_change_for_every_socket(
    alice: User, bob: User, staff: User, make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = await database_sync_to_async(make_task)(alice, name="alice-waiting", status=TaskStatus.PENDING)
    calls: list[int] = []
    original = task_consumers.queue_overview

    def counting(**kwargs: Any) -> Any:
        calls.append(1)
        return original(**kwargs)

    monkeypatch.setattr(task_consumers, "queue_overview", counting)
    sockets = {name: await open_socket("/ws/queue/", user) for name, user in (("alice", alice), ("bob", bob),
                                                                                ("staff", staff))}
    try:
        for comm in sockets.values():
            await messages_until(comm, lambda g: any(m["type"] == "queue" for m in g))
        calls.clear()
        await database_sync_to_async(make_task)(bob, name="bobs-task", status=TaskStatus.PENDING, priority=9)
        await database_sync_to_async(broadcast)(waiting, {"event": {"kind": "created", "message": "", "time": None}})
        seen = {}
        for name, comm in sockets.items():
            got = await messages_until(comm, lambda g: any(len(m.get("entries", [])) == 2 for m in g))
            seen[name] = [e["name"] for e in got[-1]["entries"]]
        assert calls == [1]  # one computation for three sockets of three users
        assert seen == {"alice": ["another user's task", "alice-waiting"],
                        "bob": ["bobs-task", "another user's task"],
                        "staff": ["bobs-task", "alice-waiting"]}
    finally:
        for comm in sockets.values():
            await comm.disconnect()


async def test_a_queue_row_is_rendered_once_by_the_server(
    alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    task = await database_sync_to_async(make_task)(alice, name="alice-waiting", status=TaskStatus.PENDING)
    comm = await open_socket("/ws/queue/", alice)
    try:
        [message] = await messages_until(comm, lambda g: bool(g))
        row = message["html"]["entries"]
        assert f'data-key="t{task.pk}"' in row and "alice-waiting" in row
        assert f'action="/queue/{task.pk}/hold/"' in row and 'value="live"' in row  # the page puts its token in
        assert message["html"]["summary"].startswith("Waiting: 1")
    finally:
        await comm.disconnect()


async def test_a_task_list_summary_reaches_staff_watching_another_users_task(
    alice: User, staff: User, make_task: Callable[..., FinetuningTask]
) -> None:
    task = await database_sync_to_async(make_task)(alice, max_steps=10)
    comm = await open_socket(f"/ws/tasks/?ids={task.pk}", staff)
    try:
        await messages_until(comm, lambda g: bool(g))
        await database_sync_to_async(FinetuningTask.objects.filter(pk=task.pk).update)(status=TaskStatus.COMPLETED)
        await database_sync_to_async(broadcast)(task, {"status": "completed"})
        got = await messages_until(comm, lambda g: bool(g))
        assert got[0]["tasks"][0]["status"] == "completed"
    finally:
        await comm.disconnect()


def test_the_groups_are_named_by_the_writers() -> None:
    assert TASKS_GROUP == "tasks" and deployment_group(7) == "deployment.7"

"""The WebSocket consumers, driven through the real ASGI application (origin check + session auth).

They pass with the embedded default (notices go through the outbox, which one follower per process
reads) and with ``REDIS_URL`` set (notices go through Redis); the cross-process test needs Redis.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.utils import timezone

from core.live.wire import MESSAGE_TYPE, cross_process_layer
from core.swift_cli.output import MetricPoint
from finetune_platform.asgi import application
from gpus.models import Run
from tasks import selectors
from tasks.models import ExportStatus, FinetuningTask, TaskExport, TaskLogLine, TaskMetric, TaskStatus
from tasks.publisher import ProgressPublisher, broadcast, publish_event, task_group
from tests.conftest import REPO
from tests.web.conftest import RUN_FIELDS, ws_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@dataclass
class Received:
    """Everything a socket received, merged the way the page merges it."""

    seqs: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        for line in message.get("lines", []):
            self.seqs.append(line["seq"])
            self.texts.append(line["text"])
        self.metrics += message.get("metrics", [])
        self.events += message.get("events", [])
        self.state.update(message.get("state", {}))


async def _next(comm: WebsocketCommunicator, timeout: float) -> dict[str, Any] | None:
    """The next message within ``timeout``, or None. (``receive_json_from`` with a timeout would
    cancel the application when it expires; ``receive_nothing`` does not.)"""
    if await comm.receive_nothing(timeout=timeout, interval=0.02):
        return None
    return await comm.receive_json_from(timeout=5)


async def collect(
    comm: WebsocketCommunicator, until: Callable[[Received], bool], timeout: float = 8.0, got: Received | None = None
) -> Received:
    got = got or Received()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until(got):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"not received within {timeout} s; got {got.messages}")
        message = await _next(comm, min(remaining, 0.2))
        if message is not None:
            got.add(message)
    return got


async def quiet(comm: WebsocketCommunicator, seconds: float) -> Received:
    """What arrives in the next ``seconds`` (to show that nothing more does)."""
    got = Received()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        message = await _next(comm, min(remaining, 0.2))
        if message is not None:
            got.add(message)
    return got


def socket(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=headers)


def publish_lines(task_id: int, texts: list[str], metric: MetricPoint | None = None) -> None:
    """What the runner does: batch lines (and a metric) through the one publisher."""
    task = FinetuningTask.objects.get(pk=task_id)
    publisher = ProgressPublisher(task)
    publisher.add_lines(texts)
    if metric is not None:
        publisher.add_metric(metric)
    publisher.flush(force=True)


def update_task(task_id: int, **fields: Any) -> None:
    """Columns of the task, and runtime columns (``RUN_FIELDS``) of its current run, where they live."""
    run_fields = {name: fields.pop(name) for name in RUN_FIELDS & set(fields)}
    FinetuningTask.objects.filter(pk=task_id).update(**fields)
    if run_fields:
        Run.objects.filter(pk=FinetuningTask.objects.get(pk=task_id).run_id).update(**run_fields)


def store_lines_silently(task_id: int, count: int) -> None:
    """Lines in the database whose broadcast was lost (the layer dropped it)."""
    task = FinetuningTask.objects.get(pk=task_id)
    now = timezone.now()
    rows = [
        TaskLogLine(task=task, seq=task.last_log_seq + i, text=f"quiet {task.last_log_seq + i}", created_at=now)
        for i in range(1, count + 1)
    ]
    TaskLogLine.objects.bulk_create(rows)
    FinetuningTask.objects.filter(pk=task_id).update(last_log_seq=rows[-1].seq)


@pytest.fixture
def alice_task(alice: User, make_task: Callable[..., FinetuningTask]) -> FinetuningTask:
    return make_task(alice, max_steps=10)


@pytest.fixture
def alice_headers(alice: User) -> list[tuple[bytes, bytes]]:
    return ws_headers(alice)


async def test_the_owner_receives_progress_metrics_and_log_batches(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    connected, _ = await comm.connect()
    assert connected
    try:
        got = await collect(comm, lambda g: g.state.get("status") == "running")
        assert got.state["max_steps"] == 10 and got.state["last_log_seq"] == 0
        metric = MetricPoint(kind="train", step=3, max_steps=10, loss=2.3456, learning_rate=1e-4, epoch=0.3)
        await database_sync_to_async(publish_lines)(alice_task.pk, ["one", "two", "three"], metric)
        got = await collect(
            comm, lambda g: g.seqs == [1, 2, 3] and g.metrics and g.state.get("progress") == 30.0, got=got
        )
        assert got.texts == ["one", "two", "three"]
        assert got.metrics[0]["step"] == 3 and got.metrics[0]["loss"] == 2.3456
        assert got.state["current_step"] == 3 and got.state["loss"] == 2.3456
        await database_sync_to_async(publish_lines)(alice_task.pk, ["four", "five"])
        got = await collect(comm, lambda g: len(g.seqs) >= 5, got=got)
        assert got.seqs == [1, 2, 3, 4, 5]
    finally:
        await comm.disconnect()


async def test_events_and_the_final_status_arrive_live(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        got = await collect(comm, lambda g: g.state.get("status") == "running")

        def finish() -> None:
            now = timezone.now()
            update_task(alice_task.pk, status=TaskStatus.COMPLETED, progress=100.0, started_at=now, finished_at=now)
            publish_event(FinetuningTask.objects.get(pk=alice_task.pk), "completed", "Completed")

        await database_sync_to_async(finish)()
        got = await collect(comm, lambda g: g.state.get("status") == "completed" and g.events, got=got)
        assert got.events[-1]["kind"] == "completed" and got.state["progress"] == 100.0
        assert got.state["finished_at"] and got.state["is_active"] is False
    finally:
        await comm.disconnect()


def card_revisions(got: Received) -> list[str]:
    return [m["cards"] for m in got.messages if "cards" in m]


async def test_the_cards_revision_comes_with_a_checkpoint_and_the_end_but_not_with_progress(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        got = await collect(comm, lambda g: g.state.get("status") == "running" and bool(card_revisions(g)))
        first = await database_sync_to_async(selectors.task_cards_revision)(task=alice_task.pk)
        assert card_revisions(got) == [first]  # what the page rendered, unless it changed since

        # Progress and log lines leave the cards alone.
        metric = MetricPoint(kind="train", step=3, max_steps=10, loss=2.3456, learning_rate=1e-4, epoch=0.3)
        await database_sync_to_async(publish_lines)(alice_task.pk, ["one", "two"], metric)
        got = await collect(comm, lambda g: g.state.get("progress") == 30.0 and len(g.seqs) == 2, got=got)
        assert card_revisions(got) == [first]

        def save_checkpoint() -> None:  # what the runner does when swift saves one
            publisher = ProgressPublisher(FinetuningTask.objects.get(pk=alice_task.pk))
            publisher.set(last_checkpoint="/out/checkpoint-3")
            publisher.event("checkpoint", "Checkpoint saved: checkpoint-3", path="/out/checkpoint-3")

        await database_sync_to_async(save_checkpoint)()
        got = await collect(comm, lambda g: len(card_revisions(g)) == 2, got=got)

        def complete() -> None:
            update_task(alice_task.pk, status=TaskStatus.COMPLETED, progress=100.0, finished_at=timezone.now(),
                        command=["swift", "sft"])
            publish_event(FinetuningTask.objects.get(pk=alice_task.pk), "completed", "Completed")

        await database_sync_to_async(complete)()
        got = await collect(comm, lambda g: g.state.get("status") == "completed" and len(card_revisions(g)) == 3,
                            got=got)
        revisions = card_revisions(got)
        assert len(set(revisions)) == 3
        assert revisions[-1] == await database_sync_to_async(selectors.task_cards_revision)(task=alice_task.pk)
        assert not card_revisions(await quiet(comm, 1.0))  # sent once per change
    finally:
        await comm.disconnect()


async def test_an_exports_progress_reaches_the_page_when_the_export_announces_it(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        got = await collect(comm, lambda g: bool(card_revisions(g)))

        def export_runs() -> None:  # a merge writes its status and log without an event
            export = TaskExport.objects.create(task=alice_task, checkpoint="/out/checkpoint-3", step=3,
                                               output_path="/out/checkpoint-3-merged")
            TaskExport.objects.filter(pk=export.pk).update(status=ExportStatus.RUNNING, log_text="merging")
            broadcast(alice_task, {"export": export.pk})  # what the export runner announces

        await database_sync_to_async(export_runs)()
        got = await collect(comm, lambda g: len(card_revisions(g)) == 2, timeout=5, got=got)
    finally:
        await comm.disconnect()


async def test_bob_is_refused_alices_task_with_4404_and_joins_no_group(alice_task: FinetuningTask, bob: User) -> None:
    headers = await database_sync_to_async(ws_headers)(bob)
    comm = socket(f"/ws/tasks/{alice_task.pk}/", headers)
    connected, code = await comm.connect()
    assert not connected and code == 4404
    layer = get_channel_layer()
    if not cross_process_layer():
        assert not layer.groups.get(task_group(alice_task.pk))
    await comm.disconnect()


async def test_a_missing_task_is_4404_too(alice_headers: list[tuple[bytes, bytes]]) -> None:
    comm = socket("/ws/tasks/999999/", alice_headers)
    connected, code = await comm.connect()
    assert not connected and code == 4404


async def test_anonymous_connections_are_refused(alice_task: FinetuningTask) -> None:
    for path in (f"/ws/tasks/{alice_task.pk}/", "/ws/tasks/"):
        comm = socket(path, ws_headers(None))
        connected, code = await comm.connect()
        assert not connected and code == 4401


async def test_a_foreign_origin_is_refused(alice_task: FinetuningTask, alice: User) -> None:
    headers = await database_sync_to_async(ws_headers)(alice, (b"origin", b"http://evil.example"))
    for path in (f"/ws/tasks/{alice_task.pk}/", "/ws/tasks/"):
        comm = socket(path, headers)
        connected, _ = await comm.connect()
        assert not connected
    no_origin = [h for h in headers if h[0] != b"origin"]
    connected, _ = await socket(f"/ws/tasks/{alice_task.pk}/", no_origin).connect()
    assert not connected


async def test_a_refused_socket_opens_no_channel_layer_receive(
    alice_task: FinetuningTask, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channels' own denier gave each refused socket a channel-layer receive (a Redis BZPOPMIN whose
    cancellation at close could hang for a minute); the platform's refusal opens none."""
    layer = get_channel_layer()
    opened: list[str] = []
    real_new_channel = layer.new_channel

    async def new_channel(*args: Any, **kwargs: Any) -> str:
        name = await real_new_channel(*args, **kwargs)
        opened.append(name)
        return name

    monkeypatch.setattr(layer, "new_channel", new_channel)
    headers = await database_sync_to_async(ws_headers)(alice, (b"origin", b"http://evil.example"))
    comm = socket(f"/ws/tasks/{alice_task.pk}/", headers)
    assert not (await comm.connect())[0]
    await comm.disconnect()
    assert opened == []


async def test_staff_may_follow_any_task(alice_task: FinetuningTask, staff: User) -> None:
    headers = await database_sync_to_async(ws_headers)(staff)
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", headers)
    assert (await comm.connect())[0]
    await collect(comm, lambda g: g.state.get("id") == alice_task.pk)
    await comm.disconnect()


async def test_reconnecting_with_after_replays_exactly_the_missing_lines(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    await database_sync_to_async(publish_lines)(alice_task.pk, [f"line {i}" for i in range(1, 6)])
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    got = await collect(comm, lambda g: len(g.seqs) >= 5)
    assert got.seqs == [1, 2, 3, 4, 5]
    await comm.disconnect()

    # While the page is away, four lines are written.
    await database_sync_to_async(publish_lines)(alice_task.pk, [f"line {i}" for i in range(6, 10)])
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=5", alice_headers)
    assert (await comm.connect())[0]
    try:
        again = await collect(comm, lambda g: len(g.seqs) >= 4)
        await database_sync_to_async(publish_lines)(alice_task.pk, ["line 10"])
        again = await collect(comm, lambda g: len(g.seqs) >= 5, got=again)
        again_more = await quiet(comm, 1.2)
        assert again.seqs + again_more.seqs == [6, 7, 8, 9, 10]
        assert again.texts == [f"line {i}" for i in range(6, 11)]
    finally:
        await comm.disconnect()


async def test_a_first_resume_message_works_like_after(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    await database_sync_to_async(publish_lines)(alice_task.pk, ["a", "b", "c", "d"])
    comm = socket(f"/ws/tasks/{alice_task.pk}/", alice_headers)
    assert (await comm.connect())[0]
    try:
        await comm.send_json_to({"type": "resume", "after": 2})
        got = await collect(comm, lambda g: len(g.seqs) >= 2)
        got.seqs += (await quiet(comm, 1.5)).seqs
        assert got.seqs == [3, 4]
    finally:
        await comm.disconnect()


async def test_a_lost_broadcast_is_repaired_from_the_database_without_duplicates(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        got = await collect(comm, lambda g: g.state.get("status") == "running")
        # Lines 1-4 are stored, but only the message carrying 3-4 arrives (1-2 were dropped).
        await database_sync_to_async(store_lines_silently)(alice_task.pk, 4)
        group = task_group(alice_task.pk)
        late = {"type": MESSAGE_TYPE, "group": group, "payload": {
            "task": alice_task.pk,
            "status": "running",
            "lines": [{"seq": 3, "text": "quiet 3", "time": None}, {"seq": 4, "text": "quiet 4", "time": None}],
        }}
        await get_channel_layer().group_send(task_group(alice_task.pk), late)
        got = await collect(comm, lambda g: len(g.seqs) >= 4, got=got)
        await get_channel_layer().group_send(task_group(alice_task.pk), late)  # a duplicate delivery
        got.seqs += (await quiet(comm, 1.2)).seqs
        assert got.seqs == [1, 2, 3, 4]
        assert got.texts == ["quiet 1", "quiet 2", "quiet 3", "quiet 4"]
    finally:
        await comm.disconnect()


async def test_a_client_backfill_request_resends_from_its_last_line(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    await database_sync_to_async(publish_lines)(alice_task.pk, ["a", "b", "c"])
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        await collect(comm, lambda g: len(g.seqs) >= 3)
        await comm.send_json_to({"type": "backfill", "after": 1})
        got = await collect(comm, lambda g: len(g.seqs) >= 2)
        assert got.seqs == [2, 3] and got.texts == ["b", "c"]
    finally:
        await comm.disconnect()


async def test_a_tail_line_whose_broadcast_was_lost_arrives_with_the_next_notice(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        await collect(comm, lambda g: g.state.get("status") == "running")
        await database_sync_to_async(store_lines_silently)(alice_task.pk, 2)
        assert not (await quiet(comm, 0.5)).seqs  # no socket polls the database
        # The next flush (progress only, no lines) says the last sequence number is 2.
        metric = MetricPoint(kind="train", step=1, max_steps=10, loss=2.0, learning_rate=1e-4, epoch=0.1)
        await database_sync_to_async(publish_lines)(alice_task.pk, [], metric)
        got = await collect(comm, lambda g: len(g.seqs) >= 2, timeout=5)
        assert got.seqs == [1, 2] and got.texts == ["quiet 1", "quiet 2"]
    finally:
        await comm.disconnect()


async def test_deleting_the_task_tells_the_page_and_closes(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    await collect(comm, lambda g: g.state.get("status") == "running")

    def purge() -> None:  # what tasks.services.finetuning_task_purge does, and announces
        FinetuningTask.objects.filter(pk=alice_task.pk).delete()
        broadcast(alice_task, {"deleted": True})

    await database_sync_to_async(purge)()
    got = await collect(comm, lambda g: any(m.get("type") == "deleted" for m in g.messages))
    assert got.messages[-1] == {"type": "deleted"}
    assert (await comm.receive_output(timeout=2))["type"] == "websocket.close"


async def test_group_membership_is_renewed(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.live.hub.GROUP_REFRESH_SECONDS", 0.1)
    calls: list[str] = []
    layer = get_channel_layer()
    original = layer.group_add

    async def counting(group: str, channel: str) -> None:
        calls.append(group)
        await original(group, channel)

    monkeypatch.setattr(layer, "group_add", counting)
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    await asyncio.sleep(0.5)
    await comm.disconnect()
    assert calls.count(task_group(alice_task.pk)) >= 3


# --- the list socket ---------------------------------------------------------------------------------
async def test_the_list_socket_sends_changes_of_the_watched_tasks_only_to_their_owner(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]], bob: User
) -> None:
    bob_headers = await database_sync_to_async(ws_headers)(bob)
    alice_list = socket(f"/ws/tasks/?ids={alice_task.pk}", alice_headers)
    bob_list = socket("/ws/tasks/", bob_headers)
    assert (await alice_list.connect())[0] and (await bob_list.connect())[0]
    try:
        first = (await collect(alice_list, lambda g: bool(g.messages))).messages[0]
        assert first["type"] == "tasks" and first["tasks"][0]["status"] == "running"
        await bob_list.send_json_to({"type": "watch", "ids": [alice_task.pk]})
        gone = (await collect(bob_list, lambda g: bool(g.messages))).messages[0]
        assert gone == {"type": "gone", "ids": [alice_task.pk]}

        def progress() -> None:
            FinetuningTask.objects.filter(pk=alice_task.pk).update(progress=50.0, current_step=5)
            publish_event(FinetuningTask.objects.get(pk=alice_task.pk), "checkpoint", "Checkpoint saved")

        await database_sync_to_async(progress)()
        update = (await collect(alice_list, lambda g: bool(g.messages))).messages[0]
        assert update["type"] == "tasks" and update["tasks"][0]["progress"] == 50.0
        assert update["tasks"][0]["current_step"] == 5
        assert await bob_list.receive_nothing(timeout=1.0)
    finally:
        await alice_list.disconnect()
        await bob_list.disconnect()


async def test_the_list_socket_announces_new_tasks(
    alice: User,
    alice_task: FinetuningTask,
    alice_headers: list[tuple[bytes, bytes]],
    make_task: Callable[..., FinetuningTask],
) -> None:
    comm = socket(f"/ws/tasks/?ids={alice_task.pk}&latest={alice_task.pk}", alice_headers)
    assert (await comm.connect())[0]
    try:
        await collect(comm, lambda g: bool(g.messages))

        def create() -> None:
            task = make_task(alice, name="second", status=TaskStatus.PENDING)
            publish_event(task, "created", "Created")

        await database_sync_to_async(create)()
        got = await collect(comm, lambda g: any(m["type"] == "new_tasks" for m in g.messages), timeout=8)
        assert got.messages[-1] == {"type": "new_tasks"}
    finally:
        await comm.disconnect()


# --- across processes (Redis) ------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL (CI sets it)")
async def test_a_message_published_by_another_process_reaches_the_browser_through_redis(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    assert cross_process_layer()
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    assert (await comm.connect())[0]
    try:
        await collect(comm, lambda g: g.state.get("status") == "running")
        code = (
            "import django; django.setup()\n"
            "from tasks.models import FinetuningTask\n"
            "from tasks.publisher import broadcast\n"
            f"task = FinetuningTask(pk={alice_task.pk}, owner_id={alice_task.owner_id})\n"
            "broadcast(task, {'status': 'running', 'progress': 42.0, 'current_step': 4,\n"
            "                 'lines': [{'seq': 1, 'text': 'hello from another process', 'time': None}]})\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=str(REPO),
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, output.decode()
        got = await collect(comm, lambda g: g.seqs == [1] and g.state.get("progress") == 42.0)
        assert got.texts == ["hello from another process"]
    finally:
        await comm.disconnect()


async def test_a_page_that_drew_a_sample_is_sent_only_the_metric_points_after_its_cursor(
    alice_task: FinetuningTask, alice_headers: list[tuple[bytes, bytes]]
) -> None:
    """The task page draws its chart from a bounded sample of the points up to ``metrics_after`` (the
    newest point when it rendered); its socket then sends only later points, not the first 5,000."""

    def store(steps: range) -> None:
        TaskMetric.objects.bulk_create(TaskMetric(task_id=alice_task.pk, kind="train", step=s, loss=1.0) for s in steps)

    await database_sync_to_async(store)(range(1, 51))
    cursor = await database_sync_to_async(selectors.task_metric_cursor)(task=alice_task.pk)
    await database_sync_to_async(store)(range(51, 54))
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0&metrics_after={cursor}", alice_headers)
    connected, _ = await comm.connect()
    assert connected
    try:
        got = await collect(comm, lambda g: len(g.metrics) >= 3)
        got.metrics += (await quiet(comm, 0.5)).metrics
        assert [m["step"] for m in got.metrics] == [51, 52, 53]
    finally:
        await comm.disconnect()
    # Without the cursor (an old page, or a client of its own) every point is sent, as before.
    comm = socket(f"/ws/tasks/{alice_task.pk}/?after=0", alice_headers)
    connected, _ = await comm.connect()
    try:
        got = await collect(comm, lambda g: len(g.metrics) >= 53)
        assert [m["step"] for m in got.metrics] == list(range(1, 54))
    finally:
        await comm.disconnect()

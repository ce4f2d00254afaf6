"""NaN and ±infinity are data (security review H4): a diverged loss or an overflowed gradient norm is
stored as null with its kind beside it, sent as valid JSON, shown as "NaN"/"∞", and never fails a run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from core.live.wire import encode_json
from core.swift_cli.output import JsonlTail, LogSplitter, MetricPoint, interpret_logging_record
from finetune_platform.asgi import application
from tasks.models import FinetuningTask, TaskMetric, TaskStatus
from tasks.publisher import NONFINITE_KEY, ProgressPublisher
from tasks.templatetags.task_format import format_significant
from tests.conftest import FIXTURES, announce_host
from tests.runs import run_task

RECORDED = FIXTURES / "swift_outputs" / "nonfinite"


def test_the_recorded_diverged_run_is_read_as_nulls_with_their_kinds() -> None:
    records = JsonlTail(RECORDED / "logging.jsonl").read()
    meanings = [interpret_logging_record(r) for r in records]
    points = [m.point for m in meanings if m.point is not None]
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(p.loss, float) and not p.nonfinite for p in points[:3])
    for p in points[3:]:  # swift wrote "loss": NaN, "grad_norm": NaN from step 4 on
        assert p.loss is None and p.grad_norm is None and isinstance(p.learning_rate, float)
        assert p.nonfinite == {"loss": "nan", "grad_norm": "nan"}
        assert p.values["loss"] is None and p.values["token_acc"] == 0.0
        json.dumps(p.values, allow_nan=False)
    summary = next(m for m in meanings if m.summary is not None and "train_runtime" in m.summary)
    assert summary.summary is not None and summary.summary["train_loss"] is None
    assert summary.nonfinite == {"train_loss": "nan"}
    final = meanings[-1]
    assert final.last_checkpoint and final.last_checkpoint.endswith("checkpoint-6")
    for meaning in meanings:
        json.dumps(meaning.summary, allow_nan=False)  # what a JSON column accepts


def test_the_recorded_log_says_nan_in_its_progress_dicts() -> None:
    lines = LogSplitter().feed((RECORDED / "train.log").read_bytes())
    dicts = [line for line in lines if line.startswith("{'loss': 'nan'")]
    assert len(dicts) == 3
    record = eval(dicts[0], {"__builtins__": {}})  # noqa: S307 - a recorded literal dict of strings
    point = interpret_logging_record(record).point
    assert point is not None and point.step == 4 and point.loss is None
    assert point.nonfinite == {"loss": "nan", "grad_norm": "nan"}


def test_stdout_strings_and_json_infinities_become_nulls_with_their_kinds() -> None:
    point = interpret_logging_record(
        {"loss": "nan", "grad_norm": "inf", "learning_rate": "-inf", "global_step/max_steps": "4/6"}
    ).point
    assert point is not None and (point.loss, point.grad_norm, point.learning_rate) == (None, None, None)
    assert point.nonfinite == {"loss": "nan", "grad_norm": "inf", "learning_rate": "-inf"}
    record = json.loads('{"eval_loss": Infinity, "epoch": 1.0, "global_step/max_steps": "5/10"}')
    point = interpret_logging_record(record).point
    assert point is not None and point.kind == "eval" and point.loss is None
    assert point.nonfinite == {"eval_loss": "inf", "loss": "inf"}


def test_numbers_for_humans_say_nan_and_infinity() -> None:
    assert format_significant(float("nan")) == "NaN"
    assert format_significant(float("inf")) == "∞" and format_significant(float("-inf")) == "−∞"
    assert format_significant(None, 4, "nan") == "NaN" and format_significant(None, 4, "inf") == "∞"
    assert format_significant(None) == "–" and format_significant(None, 4, None) == "–"
    assert encode_json({"loss": float("nan"), "x": [float("inf"), 1.5]}) == '{"loss": null, "x": [null, 1.5]}'


def test_a_loss_that_recovers_clears_its_nan_mark(alice: User, make_task: Callable[..., FinetuningTask]) -> None:
    publisher = ProgressPublisher(make_task())
    publisher.add_metric(MetricPoint(kind="train", step=1, max_steps=4, loss=None, nonfinite={"loss": "nan"}))
    assert publisher.task.loss is None and publisher.task.metrics == {NONFINITE_KEY: {"loss": "nan"}}
    assert publisher.flush(force=True)
    publisher.add_metric(MetricPoint(kind="train", step=2, max_steps=4, loss=1.5))
    assert publisher.flush(force=True)
    task = FinetuningTask.objects.get(pk=publisher.task.pk)
    assert task.loss == 1.5 and task.metrics == {}


@pytest.mark.usefixtures("cpu_host")
def test_a_diverged_run_completes_is_stored_with_nulls_and_renders(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], alice: User, alice_api: APIClient
) -> None:
    fake_swift(nonfinite_from_step=4)  # "loss": NaN, "grad_norm": Infinity from step 4; train_loss NaN
    task = make_task()
    assert "succeeded" in run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED and task.exit_code == 0, task.error_message
    assert task.loss is None and task.metrics["train_loss"] is None
    assert task.metrics[NONFINITE_KEY] == {"loss": "nan", "train_loss": "nan"}
    assert task.metrics["train_runtime"] > 0
    points = list(TaskMetric.objects.filter(task=task, kind="train").order_by("step"))
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(p.loss, float) and NONFINITE_KEY not in p.values for p in points[:3])
    for p in points[3:]:
        assert p.loss is None and p.grad_norm is None and isinstance(p.learning_rate, float)
        assert p.values[NONFINITE_KEY] == {"loss": "nan", "grad_norm": "inf"} and p.values["loss"] is None

    detail = alice_api.get(f"/api/finetuning/tasks/{task.pk}/")
    assert detail.status_code == 200 and b"NaN" not in detail.content and b"Infinity" not in detail.content
    body = detail.json()
    assert body["loss"] is None and body["metrics"][NONFINITE_KEY] == {"loss": "nan", "train_loss": "nan"}
    metrics = alice_api.get(f"/api/finetuning/tasks/{task.pk}/metrics/")
    assert metrics.status_code == 200 and b"NaN" not in metrics.content
    last = metrics.json()["results"][-1]
    assert last["loss"] is None and last["grad_norm"] is None
    assert last["values"][NONFINITE_KEY] == {"loss": "nan", "grad_norm": "inf"}
    assert metrics.json()["summary"]["train_loss"] is None

    page = Client()
    page.force_login(alice)
    response = page.get(f"/tasks/{task.pk}/")
    assert response.status_code == 200
    state = json.loads(response.content.decode().split('id="task-state" type="application/json">')[1]
                       .split("</script>")[0])
    assert state["loss"] is None and state[NONFINITE_KEY]["loss"] == "nan"
    # The server renders "NaN" itself (before any script runs), on the page and in the list's row.
    assert '<dd data-field="loss">NaN</dd>' in response.content.decode()
    listing = page.get("/tasks/")
    assert listing.status_code == 200 and '<td class="num" data-field="loss">NaN</td>' in listing.content.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_the_task_socket_sends_nulls_with_their_kinds(alice: User) -> None:
    from tests.web.conftest import ws_headers

    def prepare() -> int:
        announce_host(cpu=1)
        task = FinetuningTask.objects.create(owner=alice, name="diverged", base_model="m", status=TaskStatus.RUNNING)
        publisher = ProgressPublisher(task)
        publisher.add_metric(MetricPoint(kind="train", step=1, max_steps=2, loss=2.0, learning_rate=1e-4))
        publisher.add_metric(MetricPoint(kind="train", step=2, max_steps=2, loss=None, grad_norm=None,
                                         nonfinite={"loss": "nan", "grad_norm": "inf"},
                                         values={"loss": None, "grad_norm": None}))
        assert publisher.flush(force=True)
        return task.pk

    task_id = await sync_to_async(prepare)()
    headers = await sync_to_async(ws_headers)(alice)
    comm = WebsocketCommunicator(application, f"/ws/tasks/{task_id}/?after=0", headers=headers)
    assert (await comm.connect())[0]
    try:
        state: dict[str, object] = {}
        metrics: list[dict[str, object]] = []
        while not (metrics and state):
            raw = await comm.receive_from(timeout=5)
            assert "NaN" not in raw and "Infinity" not in raw
            message = json.loads(raw)
            metrics += message.get("metrics", [])
            state.update(message.get("state", {}))
        assert state["loss"] is None and state[NONFINITE_KEY] == {"loss": "nan"}
        assert metrics[-1]["loss"] is None and metrics[-1][NONFINITE_KEY] == {"loss": "nan", "grad_norm": "inf"}
        assert not math.isnan(float(metrics[0]["loss"]))  # type: ignore[arg-type]
    finally:
        await comm.disconnect()


def test_the_recorded_fixture_paths_are_scrubbed() -> None:
    for path in (RECORDED / "train.log", RECORDED / "logging.jsonl"):
        text = Path(path).read_text()
        assert "/tmp/" not in text and "$LAB" in text

"""A database outage never kills a run (security review H3): the publisher keeps lines, metrics and
events buffered while writes fail, retries with backoff, and writes each exactly once when the
database answers again; the runner follows swift on and writes the final state when it can. The
export and deployment runners skip what fails and retry it, and record their ending when they can.

These tests fake the failing database (a write that raises ``OperationalError``); the real outages
(a killed PostgreSQL connection, SQLite locked for a minute) are in test_real_database_outage.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import OperationalError, transaction
from django.db.models.query import QuerySet

from core.swift_cli.output import MetricPoint
from deployments.models import DeploymentLogLine, DeploymentStatus
from deployments.services import deployment_create, deployment_stop
from gpus import supervisor as supervisor_module
from gpus.models import RunStatus
from gpus.outage import Backoff
from gpus.process import process_matches
from gpus.scheduler import dispatch
from gpus.supervisor import Supervisor, claim
from gpus.workloads import Outcome
from tasks import publisher as publisher_module
from tasks import services
from tasks import workloads as workloads_module
from tasks.models import FinetuningTask, TaskEvent, TaskExport, TaskLogLine, TaskMetric, TaskStatus
from tasks.publisher import ProgressPublisher
from tests.conftest import announce_host, wait_for
from tests.deployments.conftest import Runners, deploy_ports, runners, wait_status  # noqa: F401 - the fixtures
from tests.runs import run_export, run_task


class Failing:
    """Wraps a database call: the calls numbered in ``fail`` (1-based) raise ``OperationalError``."""

    def __init__(self, real: Callable[..., Any], fail: range, message: str = "database is locked") -> None:
        self.real, self.fail, self.message = real, fail, message
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            raise OperationalError(self.message)
        return self.real(*args, **kwargs)


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backoff, "FIRST", 0.01)
    monkeypatch.setattr(Backoff, "CAP", 0.05)


def flush_until_written(publisher: ProgressPublisher, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not publisher.flush(force=True):
        assert time.monotonic() < deadline, "the publisher never wrote its buffer"
        publisher.backoff.wait()


def stored(task: FinetuningTask) -> list[tuple[int, str]]:
    return list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("seq", "text"))

def fail_stop_checks(monkeypatch: pytest.MonkeyPatch, *, times: int, message: str) -> dict[str, int]:
    """Make a supervisor's stop-request reads fail ``times`` times with ``message``; returns the counter."""
    real_values = QuerySet.values
    stop_checks = {"n": 0}

    def values(self: QuerySet[Any], *fields: str, **expressions: Any) -> QuerySet[Any]:
        if fields == ("status", "runner_instance", "stop_requested_at"):
            stop_checks["n"] += 1
            if stop_checks["n"] <= times:
                raise OperationalError(message)
        return real_values(self, *fields, **expressions)

    monkeypatch.setattr(QuerySet, "values", values)
    return stop_checks



def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.5, cap=5.0)
    assert backoff.ready() and backoff.succeeded() is None
    assert [backoff.failed() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert not backoff.ready()
    down = backoff.succeeded()
    assert down is not None and down >= 0 and backoff.ready()
    assert backoff.failed() == 0.5


def test_failing_writes_keep_lines_metrics_and_events_buffered_until_one_succeeds(
    make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task()
    publisher = ProgressPublisher(task)
    failing = Failing(TaskLogLine.objects.bulk_create, fail=range(1, 4))
    monkeypatch.setattr(TaskLogLine.objects, "bulk_create", failing)

    publisher.add_lines(["one", "two"])
    publisher.add_metric(MetricPoint(kind="train", step=1, max_steps=4, loss=1.25))
    publisher.event("checkpoint", "Checkpoint saved: checkpoint-1", path="/x/checkpoint-1")  # write 1 fails
    assert failing.calls == 1 and publisher.pending and publisher.backoff.failures == 1
    assert not publisher.flush(force=True) and failing.calls == 1  # within the backoff: not even tried
    publisher.add_lines(["three"])
    flush_until_written(publisher)  # writes 2 and 3 fail, 4 succeeds
    assert failing.calls == 4 and not publisher.pending and publisher.backoff.failures == 0

    publisher.add_lines(["four"])
    assert publisher.flush(force=True)
    assert stored(task) == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
    task.refresh_from_db()
    assert task.last_log_seq == 4 and task.loss == 1.25 and task.current_step == 1
    assert list(TaskMetric.objects.filter(task=task).values_list("step", "loss")) == [(1, 1.25)]
    assert list(TaskEvent.objects.filter(task=task, kind="checkpoint").values_list("message", flat=True)) == [
        "Checkpoint saved: checkpoint-1"
    ]


def test_an_event_written_late_keeps_the_time_it_happened(
    make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task()
    monkeypatch.setattr(Backoff, "FIRST", 1.5)
    monkeypatch.setattr(Backoff, "CAP", 1.5)
    publisher = ProgressPublisher(task)
    failing = Failing(TaskEvent.objects.create, fail=range(1, 2))
    monkeypatch.setattr(TaskEvent.objects, "create", failing)
    publisher.event("checkpoint", "Checkpoint saved: checkpoint-3")
    happened = publisher._events[0].at
    flush_until_written(publisher)  # 1.5 s later
    event = TaskEvent.objects.get(task=task, kind="checkpoint")
    assert event.created_at == happened


def test_a_write_whose_commit_answer_was_lost_is_not_written_twice(
    make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the server committed: the retry must neither repeat the lines
    (their sequence numbers would collide, forever) nor the events."""
    task = make_task()
    publisher = ProgressPublisher(task)
    lose_answers = {1, 2}
    entered = {"n": 0}

    @contextlib.contextmanager
    def commit_then_lose_the_answer(*args: Any, **kwargs: Any) -> Iterator[None]:
        with transaction.atomic(*args, **kwargs):
            yield
        entered["n"] += 1
        if entered["n"] in lose_answers:
            raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(publisher_module, "transaction", SimpleNamespace(atomic=commit_then_lose_the_answer))
    publisher.add_lines(["one", "two"])
    publisher.event("checkpoint", "Checkpoint saved: checkpoint-1")  # committed, answer lost
    assert publisher.pending
    flush_until_written(publisher)
    publisher.event("stopped", "only an event")  # committed, answer lost (no lines to look for)
    flush_until_written(publisher)
    publisher.add_lines(["three"])
    assert publisher.flush(force=True)

    assert stored(task) == [(1, "one"), (2, "two"), (3, "three")]
    kinds = list(TaskEvent.objects.filter(task=task, kind__in=["checkpoint", "stopped"]).values_list("kind", flat=True))
    assert kinds == ["checkpoint", "stopped"]


@pytest.mark.usefixtures("cpu_host")
def test_a_full_buffer_stops_reading_the_log_until_the_database_is_back(
    make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    task = make_task()
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 5001)))
    monkeypatch.setattr(supervisor_module, "_READ_CHUNK", 4096)
    monkeypatch.setattr(publisher_module, "MAX_BUFFERED_CHARS", 20_000)
    claimed = claim(task.run_id)  # the publisher writes only for the supervisor owning the run
    assert claimed is not None
    claimed.log_file_path = str(log)
    run = Supervisor(claimed)
    publisher = run.workload.publisher
    away = Failing(TaskLogLine.objects.bulk_create, fail=range(1, 10**6))
    monkeypatch.setattr(TaskLogLine.objects, "bulk_create", away)

    for _ in range(3):  # the supervise loop, while every write fails
        assert run.read_output() is False
        assert not publisher.flush(force=True)
        publisher.backoff.wait()
    held = len(publisher._lines)
    assert 0 < held < 1000 and run.log_offset < log.stat().st_size  # the rest waits in the file

    monkeypatch.setattr(TaskLogLine.objects, "bulk_create", away.real)  # the database is back
    run.drain()
    assert [text for _, text in stored(task)] == [f"line {i}" for i in range(1, 5001)]
    assert [seq for seq, _ in stored(task)] == list(range(1, 5001))


@pytest.mark.usefixtures("cpu_host")
def test_the_final_state_is_written_once_the_database_answers_again(
    make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task()
    run = claim(task.run_id)
    assert run is not None
    task.refresh_from_db()
    failing = Failing(services.finetuning_task_finish, fail=range(1, 3), message="the database system is starting up")
    monkeypatch.setattr(workloads_module, "finetuning_task_finish", failing)
    supervisor = Supervisor(run)
    # What the run buffered last (its last line, the checkpoint found at its exit) survives the retries.
    supervisor.workload.publisher.add_lines(["the last line"])
    supervisor.workload.publisher.set(last_checkpoint="/x/checkpoint-6")
    supervisor.end(Outcome(RunStatus.SUCCEEDED, exit_code=0))
    assert failing.calls == 3
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.last_checkpoint == "/x/checkpoint-6" and stored(task)[-1][1] == "the last line"


@pytest.mark.usefixtures("cpu_host")
def test_a_run_survives_failing_writes_and_stop_checks_and_loses_no_line(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """H3's repro: log writes and stop-request reads fail for a while during a run. swift is not
    stopped, and every line is stored once, in order."""
    fake_swift(lines=300, lines_rate=500, step_seconds=0.25)
    task = make_task()
    writes = Failing(TaskLogLine.objects.bulk_create, fail=range(2, 8))
    monkeypatch.setattr(TaskLogLine.objects, "bulk_create", writes)
    stop_checks = fail_stop_checks(monkeypatch, times=2, message="terminating connection due to administrator command")
    assert "succeeded" in run_task(task.pk)
    task.refresh_from_db()
    assert writes.calls >= 8 and stop_checks["n"] > 2  # both really failed, more than once
    assert task.status == TaskStatus.COMPLETED and task.exit_code == 0, task.error_message
    lines = stored(task)
    assert [seq for seq, _ in lines] == list(range(1, len(lines) + 1)) and task.last_log_seq == len(lines)
    fake = [text for _, text in lines if text.startswith("fake line ")]
    assert fake == [f"fake line {i}" for i in range(1, 301)]
    steps = list(TaskMetric.objects.filter(task=task, kind="train").order_by("step").values_list("step", flat=True))
    assert steps == [1, 2, 3, 4, 5, 6]
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds.count("started") == 1 and kinds.count("checkpoint") == 2 and kinds[-1] == "completed"


# --- the export and deployment runners get the same tolerance --------------------------------------
@pytest.mark.usefixtures("cpu_host")
def test_an_export_goes_on_through_failing_stop_checks_and_records_its_end_when_it_can(
    fake_swift: Callable[..., None], make_task: Callable[..., FinetuningTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task()
    run_task(task.pk)
    fake_swift(step_seconds=1.2)  # the merge takes a moment: a few stop checks
    export = services.task_export_create(task=task)
    dispatch()  # an export books the CPU slot the task freed (after commit in production)
    stop_checks = fail_stop_checks(monkeypatch, times=2, message="database is locked")
    finishes = Failing(services.task_export_finish, fail=range(1, 2))
    monkeypatch.setattr(workloads_module, "task_export_finish", finishes)
    assert run_export(export.pk) == f"run {export.run_id} (export {export.pk}): succeeded"
    assert stop_checks["n"] >= 2 and finishes.calls == 2
    assert Path(TaskExport.objects.get(pk=export.pk).output_path, "config.json").is_file()




@pytest.mark.timeout(120)
def test_a_deployment_keeps_serving_through_failing_log_writes_and_stop_checks(
    runners: Runners, alice: User, local_model: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811 - the fixture
) -> None:
    announce_host(cpu=1)
    writes = Failing(DeploymentLogLine.objects.bulk_create, fail=range(2, 5))
    monkeypatch.setattr(DeploymentLogLine.objects, "bulk_create", writes)
    stop_checks = fail_stop_checks(monkeypatch, times=3, message="terminating connection due to administrator command")
    deployment = deployment_create(owner=alice, name="fake", model="fake-model", gpu_config={"cpu": True})
    runners.dispatch_and_start(deployment)
    row = wait_status(deployment, DeploymentStatus.RUNNING)
    wait_for(lambda: stop_checks["n"] > 3)
    assert writes.calls >= 4 and process_matches(row.pid, row.process_started)
    deployment_stop(deployment=row)
    assert "stopped" in runners.join(row.pk)
    row.refresh_from_db()
    assert row.status == DeploymentStatus.STOPPED
    seqs = list(DeploymentLogLine.objects.filter(deployment=row).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))

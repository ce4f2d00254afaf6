"""The task lists and the task page cost the same number of queries however many tasks (and metric
points) there are: each list reads a page's keys, then its rows with their runs and reservations; the
task page draws its chart from a bounded sample of the points. (bench/scale.py measures the time.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from gpus.models import Gpu, Lane, Reservation, Run, RunKind, RunStatus
from tasks.models import FinetuningTask, MetricKind, TaskMetric, TaskStatus
from tasks.selectors import CHART_SAMPLE, task_metric_sample
from tests.conftest import announce_host

pytestmark = pytest.mark.django_db

RUN_STATUS = {TaskStatus.RUNNING: RunStatus.RUNNING, TaskStatus.COMPLETED: RunStatus.SUCCEEDED,
              TaskStatus.FAILED: RunStatus.FAILED}


def store_task(owner: User, status: str = TaskStatus.COMPLETED, name: str = "t") -> FinetuningTask:
    """A task row with its current run (pinned to GPU devices, as a user may ask), stored directly."""
    task = FinetuningTask.objects.create(
        owner=owner, name=name, base_model="Qwen/Qwen2.5-0.5B-Instruct", model_path="Qwen/Qwen2.5-0.5B-Instruct",
        datasets=["builtin:smoke_sft"], status=status, gpu_config={"devices": "0"},
    )
    task.run = Run.objects.create(kind=RunKind.TRAIN, subject_id=task.pk, owner=owner, lane=Lane.TRAIN,
                                  status=RUN_STATUS[status], host="gpu-host", gpu_config=task.gpu_config)
    task.save(update_fields=["run"])
    return task


@pytest.fixture
def tasks(alice: User, bob: User) -> Callable[[int], None]:
    """Alice's tasks: two running on the host's GPUs (the newest), the rest ended; bob has some too."""
    host = announce_host("gpu-host", spec="2x80")

    def add(n: int) -> None:
        """Alice has ``n`` tasks: the two running ones are made again, the newest."""
        Run.objects.filter(reservations__isnull=False).delete()
        FinetuningTask.objects.filter(status=TaskStatus.RUNNING).delete()
        for i in range(n - 2 - FinetuningTask.objects.filter(owner=alice).count()):
            store_task(alice, status=TaskStatus.FAILED if i % 3 == 1 else TaskStatus.COMPLETED)
            store_task(bob)
        for gpu in Gpu.objects.filter(host=host).order_by("index"):
            running = store_task(alice, status=TaskStatus.RUNNING, name="a running task")
            Reservation.objects.create(host=host, gpu=gpu, run=running.run)

    return add


def queries(client: Client | APIClient, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, (url, response.content[:500])
    return len(captured)


@pytest.fixture
def alice_page(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.mark.parametrize("url", [
    "/api/finetuning/tasks/", "/api/finetuning/tasks/?status=completed", "/api/finetuning/tasks/?ordering=name",
    "/finetuning/getTaskList", "/finetuning/getTaskList?status=completed", "/tasks/", "/tasks/?status=completed",
])
def test_a_list_costs_the_same_queries_for_3_tasks_and_for_40(
    url: str, tasks: Callable[[int], None], alice_page: Client
) -> None:
    tasks(3)
    few = queries(alice_page, url)
    tasks(40)
    assert FinetuningTask.objects.filter(owner__username="alice").count() == 40
    assert queries(alice_page, url) == few


# Pages of ended tasks (a page with a running task reads the GPUs it holds: one query more).
@pytest.mark.parametrize("first, deep", [
    ("/api/finetuning/tasks/?status=completed", "/api/finetuning/tasks/?status=completed&page=2"),
    ("/finetuning/getTaskList?status=completed", "/finetuning/getTaskList?status=completed&page=3"),
    ("/tasks/?status=completed", "/tasks/?status=completed&page=2"),
])
def test_a_deep_page_costs_what_the_first_costs(
    first: str, deep: str, tasks: Callable[[int], None], alice_page: Client
) -> None:
    tasks(40)
    assert queries(alice_page, deep) == queries(alice_page, first)


def test_a_deep_api_page_holds_the_tasks_an_offset_would(tasks: Callable[[int], None], alice_page: Client) -> None:
    tasks(45)
    newest_first = list(FinetuningTask.objects.filter(owner__username="alice").values_list("pk", flat=True))
    body = alice_page.get("/api/finetuning/tasks/?page=2").json()
    assert body["count"] == 45
    assert [t["id"] for t in body["results"]] == newest_first[20:40]
    assert body["next"].endswith("?page=3") and body["previous"].endswith("/api/finetuning/tasks/")
    seed = alice_page.get("/finetuning/getTaskList?page=3&pageSize=10").json()["data"]
    assert [t["id"] for t in seed["list"]] == newest_first[20:30] and seed["total"] == 45
    by_name = alice_page.get("/api/finetuning/tasks/?ordering=-name&page=2").json()["results"]
    assert len(by_name) == 20


def _points(task: FinetuningTask, n: int) -> None:
    TaskMetric.objects.bulk_create(
        TaskMetric(task=task, kind=MetricKind.EVAL if step % 50 == 0 else MetricKind.TRAIN, step=step,
                   loss=1.0 / step, learning_rate=1e-4)
        for step in range(1, n + 1)
    )


def test_the_task_page_costs_the_same_queries_for_3_metric_points_and_for_3000(
    alice: User, alice_page: Client
) -> None:
    small, big = store_task(alice), store_task(alice)
    _points(small, 3)
    _points(big, 3000)
    assert queries(alice_page, f"/tasks/{small.pk}/") == queries(alice_page, f"/tasks/{big.pk}/")


def test_the_task_page_charts_a_bounded_sample_with_the_first_and_last_points(
    alice: User, alice_page: Client
) -> None:
    small, big = store_task(alice), store_task(alice)
    _points(small, 20)
    _points(big, 3000)
    assert [(p.kind, p.step) for p in task_metric_sample(task=small)] == [
        (p.kind, p.step) for p in TaskMetric.objects.filter(task=small).order_by("step")]
    sample = task_metric_sample(task=big)
    train = [p.step for p in sample if p.kind == MetricKind.TRAIN]
    evals = [p.step for p in sample if p.kind == MetricKind.EVAL]
    assert len(train) <= CHART_SAMPLE + 1 and train[0] == 1 and train[-1] == 2999
    assert evals == list(range(50, 3001, 50))  # 60 evaluations: every one
    assert train == sorted(set(train))
    page = alice_page.get(f"/tasks/{big.pk}/")
    assert page.context["chart_points"][-1] == {"kind": "eval", "step": 3000, "loss": 1 / 3000,
                                               "learning_rate": 1e-4}
    assert b'id="chart-points"' in page.content
    # Its socket is asked only for the points after the newest one the sample could hold.
    newest = TaskMetric.objects.filter(task=big).order_by("-pk").first()
    assert f'data-metrics-after="{newest.pk}"'.encode() in page.content

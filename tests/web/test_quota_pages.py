"""A task held back by a quota is not silently starved: its page and the queue say which quota and how
much of it is used, live, and it starts by itself once the quota allows (issue 12)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from accounts.models import Quota
from gpus.models import Run, RunKind, RunStatus
from gpus.scheduler import dispatch
from tasks import services
from tasks.consumers import task_state
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host

ARGS = {"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}


@pytest.fixture
def gpu_host(db: None) -> Any:
    return announce_host(spec="2x80")


def used_gpu_hours(owner: User, hours: float) -> Run:
    """A finished run of ``owner`` that held one 80 GB GPU for ``hours`` within the last day."""
    end = timezone.now() - timedelta(hours=1)
    return Run.objects.create(
        kind=RunKind.TRAIN, subject_id=999_999, owner=owner, status=RunStatus.SUCCEEDED,
        resources={"gpus": {"Fake GPU 80GB": 1}, "cpu_slots": 0},
        started_at=end - timedelta(hours=hours), finished_at=end,
    )


def test_a_task_over_its_gpu_hour_quota_waits_and_says_why(
    alice: User, gpu_host: Any, local_model: Path, client: Client
) -> None:
    used_gpu_hours(alice, 3)
    Quota.objects.create(scope="user", user=alice, gpu_hours_per_week=2)
    task = services.finetuning_task_create(owner=alice, name="colors", base_model=str(local_model),
                                           datasets=["builtin:smoke_sft"], training_args=ARGS,
                                           gpu_config={"count": 1})
    assert dispatch() == []
    task = FinetuningTask.objects.get(pk=task.pk)
    assert task.status == TaskStatus.PENDING
    assert "gpu_hours_per_week" in task.wait_reason and "3.0 of 2" in task.wait_reason
    assert task_state(task)["wait_reason"] == task.wait_reason
    client.force_login(alice)
    page = client.get(f"/tasks/{task.pk}/").content.decode()
    assert 'data-field="wait-reason"' in page and "gpu_hours_per_week" in page
    queue = client.get("/queue/").content.decode()
    assert "gpu_hours_per_week" in queue

    # Staff raise the quota: the next dispatch starts it and the reason is gone.
    Quota.objects.filter(user=alice).update(gpu_hours_per_week=10)
    assert dispatch() == [task.run_id]
    task = FinetuningTask.objects.get(pk=task.pk)
    assert task.status == TaskStatus.QUEUED and task.wait_reason == ""
    assert 'data-field="wait-reason"' not in client.get(f"/tasks/{task.pk}/").content.decode()


def test_other_users_see_only_that_a_task_waits_for_its_owners_quota(
    alice: User, bob: User, gpu_host: Any, local_model: Path, client: Client
) -> None:
    used_gpu_hours(alice, 3)
    Quota.objects.create(scope="user", user=alice, gpu_hours_per_week=1)
    services.finetuning_task_create(owner=alice, name="alices-secret", base_model=str(local_model),
                                    datasets=["builtin:smoke_sft"], training_args=ARGS, gpu_config={"count": 1})
    dispatch()
    client.force_login(bob)
    queue = client.get("/queue/").content.decode()
    assert "waits for its owner" in queue
    assert "gpu_hours_per_week" not in queue and "alices-secret" not in queue


def test_the_queue_lists_tasks_in_the_order_the_dispatcher_serves_them(
    alice: User, bob: User, local_model: Path, db: None
) -> None:
    """Within a priority users take turns: Bob's one task comes second, not after Alice's backlog."""
    announce_host(spec="1x80")
    make = dict(base_model=str(local_model), datasets=["builtin:smoke_sft"], training_args=ARGS,
                gpu_config={"count": 1})
    for n in range(5):
        services.finetuning_task_create(owner=alice, name=f"a{n}", **make)
    bobs = services.finetuning_task_create(owner=bob, name="b", **make)
    client = Client()
    client.force_login(bob)
    body = client.get("/api/finetuning/queue/?page_size=3").json()
    assert body["count"] == 6
    assert [entry["position"] for entry in body["results"]] == [1, 2, 3]
    # Alice's oldest task first (nobody holds a GPU yet, it is older), then Bob's, then Alice's again.
    assert [entry.get("id") for entry in body["results"]] == [None, bobs.pk, None]

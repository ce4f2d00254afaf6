"""The compute admin: staff release the GPUs of a dead host's lost runs; runs are for staff only."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from gpus import supervisor
from gpus.models import Host, Reservation, Run, RunStatus
from gpus.scheduler import dispatch
from tasks import services
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host

HOSTS = "/admin/gpus/host/"
RUNS = "/admin/gpus/run/"


def login(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def lost_task(owner: User, model: Path, settings: Any, *, host: str = "gone-host") -> FinetuningTask:
    """A task whose run was running on ``host`` when that host went silent for good: the reconciler
    of another host found it lost (its GPUs stay booked)."""
    announce_host(host, "2x80")
    task = services.finetuning_task_create(
        owner=owner, name="far away", base_model=str(model), datasets=["builtin:smoke_sft"],
        training_args={"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}, gpu_config={"count": 2},
    )
    assert dispatch() == [task.run_id]
    # Its worker there claimed it, then the host and its heartbeats went silent.
    long_ago = timezone.now() - timedelta(seconds=10 * settings.FINETUNE_LOST_AFTER_SECONDS + 60)
    assert Run.objects.filter(pk=task.run_id, status=RunStatus.QUEUED, host=host).update(
        status=RunStatus.RUNNING, runner_instance="gone", runner_pid=4242, pid=4343, started_at=long_ago,
        heartbeat_at=long_ago,
    )
    FinetuningTask.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING)
    Host.objects.filter(name=host).update(last_seen_at=long_ago)
    assert supervisor.reconcile() == [task.run_id]  # this host's reconciler finds it lost
    task.refresh_from_db()
    assert task.run.status == RunStatus.LOST and task.status == TaskStatus.FAILED
    assert Reservation.objects.filter(run=task.run_id).count() == 2  # kept: its process may still run there
    return task


def test_the_release_lost_action_frees_the_gpus_of_a_lost_run(
    staff: User, alice: User, local_model: Path, settings: Any
) -> None:
    task = lost_task(alice, local_model, settings)
    other = announce_host("healthy", "1x80")
    host = Host.objects.get(name="gone-host")
    client = login(staff)
    page = client.get(HOSTS).content.decode()
    assert "release_lost" in page and "Release the GPUs of lost runs" in page

    response = client.post(HOSTS, {"action": "release_lost", "_selected_action": [str(host.pk), str(other.pk)],
                                   "index": "0"}, follow=True)
    assert response.status_code == 200
    assert any("Released 1 lost run(s)" in str(m) for m in response.context["messages"])
    assert not Reservation.objects.filter(run=task.run_id).exists()
    run = Run.objects.get(pk=task.run_id)
    assert run.status == RunStatus.FAILED and run.finished_at is not None
    assert "considered lost" in run.error and "An operator released its GPUs (host gone-host is gone)" in run.error
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and "An operator released its GPUs" in task.error_message
    assert task.events.filter(kind="failed").count() == 1  # the task was told once, when it was found lost

    # Once released, the action has nothing left to do.
    again = client.post(HOSTS, {"action": "release_lost", "_selected_action": [str(host.pk)], "index": "0"},
                        follow=True)
    assert any("Released 0 lost run(s)" in str(m) for m in again.context["messages"])


def test_the_release_lost_action_leaves_running_and_other_hosts_runs_alone(
    staff: User, alice: User, local_model: Path, settings: Any
) -> None:
    lost = lost_task(alice, local_model, settings, host="gone-host")
    announce_host("alive", "1x80")
    busy = services.finetuning_task_create(
        owner=alice, name="busy", base_model=str(local_model), datasets=["builtin:smoke_sft"],
        training_args={"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}, gpu_config={"count": 1},
    )
    assert dispatch() == [busy.run_id]
    Run.objects.filter(pk=busy.run_id).update(status=RunStatus.RUNNING, runner_instance="alive",
                                              heartbeat_at=timezone.now())
    alive = Host.objects.get(name="alive")
    login(staff).post(HOSTS, {"action": "release_lost", "_selected_action": [str(alive.pk)], "index": "0"})
    assert Run.objects.get(pk=lost.run_id).status == RunStatus.LOST  # another host: not selected
    assert Reservation.objects.filter(run=lost.run_id).count() == 2
    assert Run.objects.get(pk=busy.run_id).status == RunStatus.RUNNING  # not lost: never released
    assert Reservation.objects.filter(run=busy.run_id).count() == 1


def test_a_non_staff_user_cannot_release_lost_runs(alice: User, local_model: Path, settings: Any) -> None:
    task = lost_task(alice, local_model, settings)
    host = Host.objects.get(name="gone-host")
    response = login(alice).post(HOSTS, {"action": "release_lost", "_selected_action": [str(host.pk)],
                                         "index": "0"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Run.objects.get(pk=task.run_id).status == RunStatus.LOST
    assert Reservation.objects.filter(run=task.run_id).count() == 2


# --- runs are for staff only --------------------------------------------------------------------------
@pytest.fixture
def a_run(alice: User, local_model: Path) -> Run:
    announce_host(spec="1x80")
    task = services.finetuning_task_create(
        owner=alice, name="alice-private-run", base_model=str(local_model), datasets=["builtin:smoke_sft"],
        training_args={"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}, gpu_config={"count": 1},
    )
    assert dispatch() == [task.run_id]
    return Run.objects.get(pk=task.run_id)


def test_staff_see_the_runs_read_only(staff: User, a_run: Run) -> None:
    client = login(staff)
    page = client.get(RUNS)
    assert page.status_code == 200 and "alice-private-run" in page.content.decode()
    assert client.get(f"{RUNS}?kind__exact=train&status__exact=queued").context["cl"].result_count == 1
    assert client.get(f"{RUNS}add/").status_code == 403
    change = client.get(f"{RUNS}{a_run.pk}/change/")
    assert change.status_code == 200
    assert not change.context["adminform"].form.fields  # every field is read-only
    client.post(f"{RUNS}{a_run.pk}/change/", {"status": "failed", "host": "elsewhere", "pid": "1"})
    a_run.refresh_from_db()
    assert a_run.status == RunStatus.QUEUED and a_run.host != "elsewhere" and a_run.pid is None


@pytest.mark.parametrize("path", ["", "{id}/change/", "{id}/delete/", "{id}/history/"])
def test_a_non_staff_user_gets_no_access_to_runs(alice: User, a_run: Run, path: str) -> None:
    client = login(alice)  # the run's own owner, but not staff
    response = client.get(RUNS + path.format(id=a_run.pk))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    response = client.post(RUNS, {"action": "delete_selected", "_selected_action": [str(a_run.pk)], "index": "0"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Run.objects.filter(pk=a_run.pk, status=RunStatus.QUEUED).exists()


def test_a_staff_user_without_permissions_sees_no_runs(alice: User, a_run: Run) -> None:
    operator = User.objects.create_user("oscar", "oscar@example.com", "oscar-pass-123", is_staff=True)
    client = login(operator)
    assert client.get(RUNS).status_code == 403
    assert client.get(f"{RUNS}{a_run.pk}/change/").status_code == 403
    index = client.get("/admin/").content.decode()
    assert "/admin/gpus/run/" not in index

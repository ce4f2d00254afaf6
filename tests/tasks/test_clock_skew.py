"""Liveness is measured with the database's clock (M6): heartbeats are stamped with ``Now()`` and
every "silent for N seconds" is ``Now() - heartbeat`` in the database, so a host whose own clock is
10 minutes ahead or behind (skew, or an NTP step) neither fails healthy runs nor keeps lost ones."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psutil
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from deployments.models import Deployment, DeploymentStatus
from gpus.models import Host, Run, RunStatus
from gpus.process import DATABASE_PATIENCE_SECONDS
from gpus.selectors import gpu_overview, host_list
from gpus.supervisor import Supervisor, reconcile
from tasks.models import ExportStatus, FinetuningTask, TaskExport, TaskStatus
from tests.conftest import announce_host
from tests.runs import stage_run, stage_task

pytestmark = pytest.mark.django_db

TEN_MINUTES = timedelta(minutes=10)
#: Longer than 3 × FINETUNE_LOST_AFTER_SECONDS (10 s in the tests), far shorter than the skew.
SILENT = timedelta(minutes=3)
#: Longer than a live runner is trusted through a database outage.
WEDGED = timedelta(seconds=DATABASE_PATIENCE_SECONDS + 60)


@pytest.fixture(params=[TEN_MINUTES, -TEN_MINUTES], ids=["ahead", "behind"])
def skewed_clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> timedelta:
    """This process's wall clock (``timezone.now()``) is 10 minutes off the database's."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + request.param)
    return request.param




def running_task(owner: User, name: str, *, host: str, silent: timedelta, **fields: Any) -> FinetuningTask:
    """A running task whose runner last beat ``silent`` ago by the database's clock (as it writes it)."""
    task = stage_task(owner, name=name, host=host, **fields)
    Run.objects.filter(pk=task.run_id).update(heartbeat_at=Now() - silent)
    return task


def test_a_skewed_reconciler_fails_the_silent_task_of_another_host_and_no_healthy_one(
    skewed_clock: timedelta, alice: User
) -> None:
    healthy = running_task(alice, "healthy", host="gpu-host-8", silent=timedelta(seconds=1))
    silent = running_task(alice, "silent", host="gpu-host-9", silent=SILENT)
    assert reconcile() == [silent.run_id]
    healthy.refresh_from_db()
    silent.refresh_from_db()
    assert healthy.status == TaskStatus.RUNNING
    assert silent.status == TaskStatus.FAILED and silent.run.status == RunStatus.LOST  # lost: reservations kept
    assert "Host gpu-host-9 stopped reporting for 180 s" in silent.error_message  # the database's 3 min


def test_a_clock_step_on_this_host_does_not_kill_its_own_live_runs(
    skewed_clock: timedelta, alice: User, sleeper: Any
) -> None:
    runner, swift = sleeper(), sleeper()
    task = running_task(alice, "mine", host=settings.FINETUNE_HOST, silent=timedelta(seconds=1),
                        runner_pid=runner.pid, pid=swift.pid, process_started=psutil.Process(swift.pid).create_time())
    assert reconcile() == []
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and swift.poll() is None


def test_a_silent_runner_on_this_host_is_lost_whatever_this_hosts_clock_says(
    skewed_clock: timedelta, alice: User, sleeper: Any
) -> None:
    runner, swift = sleeper(), sleeper()
    # Silent beyond the patience a live runner gets through a database outage (see the test below).
    task = running_task(alice, "wedged", host=settings.FINETUNE_HOST, silent=WEDGED,
                        runner_pid=runner.pid, pid=swift.pid, process_started=psutil.Process(swift.pid).create_time())
    assert reconcile() == [task.run_id]
    assert swift.wait(timeout=10) is not None  # its swift group was stopped


def test_a_skewed_reconciler_judges_deployments_by_the_database_clock(skewed_clock: timedelta, alice: User) -> None:
    rows = {}
    for name, host, silent in (("healthy", "gpu-host-8", timedelta(seconds=1)), ("silent", "gpu-host-9", SILENT)):
        rows[name] = Deployment.objects.create(owner=alice, name=name, status=DeploymentStatus.RUNNING, host=host)
        stage_run(rows[name], host=host)
        Run.objects.filter(pk=rows[name].run_id).update(heartbeat_at=Now() - silent)
    assert reconcile() == [rows["silent"].run_id]
    assert Deployment.objects.get(pk=rows["healthy"].pk).status == DeploymentStatus.RUNNING
    assert Deployment.objects.get(pk=rows["silent"].pk).status == DeploymentStatus.FAILED


def test_a_deployment_heartbeat_is_stamped_with_the_database_clock(skewed_clock: timedelta, alice: User) -> None:
    deployment = Deployment.objects.create(owner=alice, name="beat", status=DeploymentStatus.RUNNING,
                                           host=settings.FINETUNE_HOST)
    run = stage_run(deployment, host=settings.FINETUNE_HOST, runner_instance="beat",
                    heartbeat_at=timezone.now() - TEN_MINUTES)
    Supervisor(run).heartbeat()
    row = Run.objects.annotate(silent_for=Now() - F("heartbeat_at")).get(pk=run.pk)
    assert abs(row.silent_for.total_seconds()) < 5


def test_host_liveness_uses_the_database_clock(skewed_clock: timedelta, alice: User) -> None:
    announce_host("gpu-host-8", "1x80")  # its agent stamps last_seen_at with the database's clock
    announce_host("gpu-host-9", "1x80")
    Host.objects.filter(name="gpu-host-9").update(last_seen_at=Now() - SILENT)
    assert set(Host.objects.live().values_list("name", flat=True)) == {"gpu-host-8"}
    assert {h.name: h.is_live for h in host_list()} == {"gpu-host-8": True, "gpu-host-9": False}
    assert Host.objects.get(name="gpu-host-8").is_live  # without the annotation: asks the database
    seen = {h["name"]: h["seen_seconds_ago"] for h in gpu_overview(user=alice)}
    assert seen["gpu-host-8"] <= 2 and 170 <= seen["gpu-host-9"] <= 190
    states = {h["name"]: [g["state"] for g in h["gpus"]] for h in gpu_overview(user=alice)}
    assert states == {"gpu-host-8": ["free"], "gpu-host-9": ["offline"]}


def test_a_skewed_reconciler_fails_only_the_export_of_a_silent_host(skewed_clock: timedelta, alice: User) -> None:
    announce_host("gpu-host-8")
    announce_host("gpu-host-9")
    Host.objects.filter(name="gpu-host-9").update(last_seen_at=Now() - SILENT)
    task = FinetuningTask.objects.create(owner=alice, name="t", base_model="x/y", model_path="x/y",
                                         status=TaskStatus.COMPLETED)
    exports = {host: TaskExport.objects.create(task=task, checkpoint=f"/nowhere/{host}", output_path=f"/nowhere/{host}",
                                               status=ExportStatus.RUNNING)
               for host in ("gpu-host-8", "gpu-host-9")}
    for host, export in exports.items():  # its supervisor beat with the database's clock, as its host reported
        stage_run(export, host=host)
        Run.objects.filter(pk=export.run_id).update(heartbeat_at=Now() - (SILENT if host == "gpu-host-9" else
                                                                          timedelta(seconds=1)))
    assert reconcile() == [exports["gpu-host-9"].run_id]
    assert TaskExport.objects.get(pk=exports["gpu-host-8"].pk).status == ExportStatus.RUNNING
    assert TaskExport.objects.get(pk=exports["gpu-host-9"].pk).status == ExportStatus.FAILED


def test_a_live_runner_silent_through_a_database_outage_keeps_its_run(alice: User, sleeper: Any) -> None:
    """Minutes without a heartbeat (the database was away, the runner buffered) are no death on this
    host while the runner that claimed the run is alive: the reconciler must not reap swift."""
    runner, swift = sleeper(), sleeper()
    task = running_task(alice, "outage", host=settings.FINETUNE_HOST, silent=timedelta(minutes=5),
                        started_at=timezone.now(), runner_pid=runner.pid, pid=swift.pid,
                        process_started=psutil.Process(swift.pid).create_time())
    assert reconcile() == []
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and swift.poll() is None


def test_a_recycled_runner_pid_does_not_keep_a_dead_runners_run(alice: User, sleeper: Any) -> None:
    """The runner's pid now belongs to a process younger than the claim: the runner is gone."""
    swift = sleeper()
    younger = sleeper()  # started after the claim below: a recycled pid, not the runner
    task = running_task(alice, "recycled", host=settings.FINETUNE_HOST, silent=timedelta(minutes=5),
                        started_at=timezone.now() - timedelta(minutes=10), runner_pid=younger.pid, pid=swift.pid,
                        process_started=psutil.Process(swift.pid).create_time())
    assert reconcile() == [task.run_id]
    assert swift.wait(timeout=10) is not None and younger.poll() is None

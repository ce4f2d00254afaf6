"""Fair share in the dispatcher: no backlog hides another user's run, users interleave within a
priority (fewest GPUs held, then least recent GPU time), the quota gates with their reasons, what a
booking records, and a dispatch whose cost does not grow with the number of users."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Quota, QuotaScope
from gpus import scheduler
from gpus.models import Lane, Reservation, Run, RunKind, RunStatus
from gpus.scheduler import dispatch
from tasks import publisher, services
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host

GPU = "Fake GPU 80GB"
ARGS = {"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}


def waiting(owner: User, *, gpu: dict[str, Any] | None = None, priority: int = 5, lane: int = Lane.TRAIN,
            ago: float = 0.0) -> Run:
    """A waiting run with no subject (the dispatcher serves runs, whatever asked for them)."""
    kind = {Lane.TRAIN: RunKind.TRAIN, Lane.CPU: RunKind.EXPORT, Lane.DEPLOY: RunKind.DEPLOY}[lane]
    run = Run.objects.create(kind=kind, subject_id=0, owner=owner, lane=lane, priority=priority,
                             gpu_config={"count": 1} if gpu is None else gpu, label=f"{owner.username}'s run")
    if ago:
        Run.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(seconds=ago))
    return Run.objects.get(pk=run.pk)


def backlog(owner: User, n: int, *, gpu: dict[str, Any] | None = None, priority: int = 5,
            ago: float = 0.0) -> list[int]:
    """``n`` waiting runs of ``owner``, in arrival order, the first ``ago`` seconds old."""
    runs = Run.objects.bulk_create([
        Run(kind=RunKind.TRAIN, subject_id=0, owner=owner, lane=Lane.TRAIN, priority=priority,
            gpu_config={"count": 1} if gpu is None else gpu, label=f"backlog {i}") for i in range(n)
    ])
    if ago:
        start = timezone.now() - timedelta(seconds=ago)
        for i, run in enumerate(runs):
            Run.objects.filter(pk=run.pk).update(created_at=start + timedelta(milliseconds=i))
    return [run.pk for run in runs]


def start(run_id: int) -> None:
    """What a worker's claim does: the booked run runs."""
    assert Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=timezone.now())


def finish(run_id: int) -> None:
    """What the supervisor does when the process exits: the run ends and frees what it held."""
    Run.objects.filter(pk=run_id).update(status=RunStatus.SUCCEEDED, finished_at=timezone.now())
    Reservation.objects.filter(run_id=run_id).delete()


def holding(owner: User, *, gpu: dict[str, Any] | None = None) -> int:
    """A running run of ``owner`` holding a GPU (placed by the dispatcher now)."""
    run = waiting(owner, gpu=gpu, priority=10)
    assert dispatch() == [run.pk]
    start(run.pk)
    return run.pk


def used(owner: User, *, gpus: int, hours: float, ended_ago: timedelta = timedelta(0)) -> Run:
    """A finished run of ``owner`` that held ``gpus`` GPUs for ``hours``, ending ``ended_ago``."""
    end = timezone.now() - ended_ago
    return Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=owner, status=RunStatus.SUCCEEDED,
                              resources={"gpus": {GPU: gpus}, "cpu_slots": 0},
                              started_at=end - timedelta(hours=hours), finished_at=end)


def gpu_indexes(run_id: int) -> list[int]:
    return sorted(Reservation.objects.filter(run_id=run_id, gpu__isnull=False).values_list("gpu__index", flat=True))


def reason_of(run_id: int) -> str:
    return Run.objects.get(pk=run_id).wait_reason


# --- the acceptance test: one user's backlog never hides another's runnable run ---------------
def test_bobs_task_starts_first_on_the_free_gpu_past_alices_500_runs_pinned_to_a_busy_one(
    alice: User, bob: User, local_model: Path
) -> None:
    announce_host(spec="2x80")
    holding(alice, gpu={"devices": "0"})
    pinned = backlog(alice, 500, gpu={"devices": "0"}, priority=10, ago=3600)  # older and more urgent
    task = services.finetuning_task_create(
        owner=bob, name="bob's", base_model=str(local_model), datasets=["builtin:smoke_sft"],
        training_args=ARGS, gpu_config={"count": 1},
    )
    assert dispatch() == [task.run_id]
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and gpu_indexes(task.run_id) == [1]
    assert Run.objects.filter(pk__in=pinned, status=RunStatus.PENDING).count() == 500


def test_bobs_run_takes_the_free_gpu_before_alices_older_runnable_backlog_while_she_holds_one(
    alice: User, bob: User
) -> None:
    announce_host(spec="2x80")
    holding(alice)
    mine = backlog(alice, 500, ago=3600)
    bobs = waiting(bob)
    assert dispatch() == [bobs.pk]
    assert Run.objects.filter(pk__in=mine, status=RunStatus.PENDING).count() == 500


def test_users_interleave_within_one_dispatch(alice: User, bob: User) -> None:
    announce_host(spec="3x80")
    first, second, *_ = backlog(alice, 500, ago=3600)
    bobs = waiting(bob)
    # Nobody holds anything: alice's run is older; then she holds one and bob goes; then alice again.
    assert dispatch() == [first, bobs.pk, second]


# --- interleaving within a priority ---------------------------------------------------------------------
def test_when_a_gpu_frees_the_user_holding_fewer_gpus_goes_first(alice: User, bob: User) -> None:
    announce_host(spec="2x80")
    holding(alice)
    second = holding(alice)
    older = waiting(alice, ago=600)
    bobs = waiting(bob)
    assert dispatch() == []
    finish(second)  # alice still holds one GPU, bob none
    assert dispatch() == [bobs.pk]
    assert Run.objects.get(pk=older.pk).status == RunStatus.PENDING


def test_between_users_holding_as_many_gpus_the_one_who_used_less_this_window_goes_first(
    alice: User, bob: User
) -> None:
    announce_host(spec="1x80")
    used(alice, gpus=2, hours=5)
    used(bob, gpus=1, hours=1)
    alices = waiting(alice, ago=600)  # older
    bobs = waiting(bob)
    assert dispatch() == [bobs.pk]
    assert Run.objects.get(pk=alices.pk).status == RunStatus.PENDING


def test_use_older_than_the_fairshare_window_does_not_count(alice: User, bob: User, settings: Any) -> None:
    settings.FINETUNE_FAIRSHARE_WINDOW_HOURS = 24
    announce_host(spec="1x80")
    used(alice, gpus=8, hours=10, ended_ago=timedelta(days=2))
    alices = waiting(alice, ago=600)
    waiting(bob)
    assert dispatch() == [alices.pk]  # a tie on usage: first come, first served


def test_priority_still_comes_before_fairness_and_lanes_before_priority(alice: User, bob: User) -> None:
    announce_host(spec="2x80")
    holding(alice)
    bobs = waiting(bob, priority=5)
    urgent = waiting(alice, priority=9)
    assert dispatch() == [urgent.pk]
    assert Run.objects.get(pk=bobs.pk).status == RunStatus.PENDING


def test_a_users_own_runs_keep_their_order(alice: User, bob: User) -> None:
    announce_host(spec="4x80")
    a1, a2 = waiting(alice, ago=30), waiting(alice, ago=20)
    b1, b2 = waiting(bob, ago=10), waiting(bob)
    assert dispatch() == [a1.pk, b1.pk, a2.pk, b2.pk]


def test_a_long_blocked_run_still_fences_gpus_against_other_users(alice: User, bob: User, settings: Any) -> None:
    settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS = 60
    announce_host(spec="2x80")
    alices = holding(alice)
    big = waiting(bob, gpu={"count": 2}, ago=120)
    small = waiting(alice)
    assert dispatch() == []  # bob's big run waited too long: the free GPU is kept for it
    finish(alices)
    assert dispatch() == [big.pk]
    assert Run.objects.get(pk=small.pk).status == RunStatus.PENDING


# --- quota gates ------------------------------------------------------------------------------------------
def test_max_gpus_holds_a_run_back_with_its_reason_without_blocking_others(
    alice: User, bob: User, settings: Any
) -> None:
    settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS = 0  # strict order: a blocked run would fence
    announce_host(spec="3x80")
    quota = Quota.objects.create(scope=QuotaScope.USER, user=alice, max_gpus=1)
    first, second = waiting(alice, ago=20), waiting(alice, ago=10)
    bobs = waiting(bob)
    assert dispatch() == [first.pk, bobs.pk]
    assert Run.objects.get(pk=second.pk).status == RunStatus.PENDING
    assert reason_of(second.pk) == "Waiting for your GPU quota: you hold 1 of your 1 GPUs and this needs 1 (max_gpus)."
    start(first.pk)
    finish(first.pk)
    assert dispatch() == [second.pk]
    assert reason_of(second.pk) == ""
    # A run asking for more than the quota allows says so.
    quota.max_gpus = 2
    quota.save()
    pair = waiting(alice, gpu={"count": 3})
    assert dispatch() == []
    assert reason_of(pair.pk) == ("Waiting for your GPU quota: this needs 3 GPUs, more than your 2 (max_gpus); it "
                                  "cannot start unless the quota is raised.")


def test_the_reason_is_cleared_when_the_quota_no_longer_applies_even_while_the_run_still_waits(
    alice: User, bob: User
) -> None:
    announce_host(spec="2x80")  # GPU 1 stays free: a dispatch with nothing free at all reads no queue
    holding(alice, gpu={"devices": "0"})
    quota = Quota.objects.create(scope=QuotaScope.USER, user=alice, max_gpus=1)
    later = waiting(alice, gpu={"devices": "0"})
    assert dispatch() == []
    assert "you hold 1 of your 1 GPUs" in reason_of(later.pk)
    quota.max_gpus = 4
    quota.save()
    assert dispatch() == []  # the GPU it names is taken: it waits, but not for a quota
    assert reason_of(later.pk) == ""


def test_gpu_hours_per_week_holds_gpu_runs_back_until_older_use_leaves_the_window(
    alice: User, bob: User
) -> None:
    announce_host(spec="2x80", cpu=1)
    Quota.objects.create(scope=QuotaScope.USER, user=alice, gpu_hours_per_week=40)
    past = used(alice, gpus=4, hours=10.3, ended_ago=timedelta(hours=1))  # 41.2 GPU-hours
    gpu_run = waiting(alice, ago=60)
    export = waiting(alice, lane=Lane.CPU)
    bobs = waiting(bob)
    assert dispatch() == [bobs.pk, export.pk]  # an export uses no GPU quota; bob is not held back
    assert reason_of(gpu_run.pk) == (
        "Waiting for your GPU-hour quota: 41.2 of 40 GPU-hours used in the last 7 days (gpu_hours_per_week); "
        "it starts as older use leaves the window.")
    assert reason_of(export.pk) == "" and Run.objects.get(pk=export.pk).resources == {"gpus": {}, "cpu_slots": 1}
    # The week rolls on: the old use leaves the window and the next dispatch (the sweep's) starts it.
    Run.objects.filter(pk=past.pk).update(started_at=timezone.now() - timedelta(days=9),
                                          finished_at=timezone.now() - timedelta(days=8))
    assert dispatch() == [gpu_run.pk]
    assert reason_of(gpu_run.pk) == ""


def test_a_running_run_counts_towards_the_gpu_hours_quota_but_is_not_stopped(alice: User) -> None:
    announce_host(spec="2x80")
    Quota.objects.create(scope=QuotaScope.USER, user=alice, gpu_hours_per_week=1)
    running = holding(alice)
    Run.objects.filter(pk=running).update(started_at=timezone.now() - timedelta(hours=2))
    later = waiting(alice)
    assert dispatch() == []
    assert "2.0 of 1 GPU-hours" in reason_of(later.pk)
    assert Run.objects.get(pk=running).status == RunStatus.RUNNING


def test_the_task_learns_its_reason_once_per_change(
    alice: User, local_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notices: list[tuple[str, dict[str, Any]]] = []
    real = publisher.publish_many

    def record(messages: Any) -> None:
        batch = list(messages)
        notices.extend(batch)
        real(batch)

    monkeypatch.setattr(publisher, "publish_many", record)
    announce_host(spec="2x80")
    holding(alice, gpu={"devices": "0"})
    quota = Quota.objects.create(scope=QuotaScope.USER, user=alice, max_gpus=1)
    task = services.finetuning_task_create(
        owner=alice, name="waits", base_model=str(local_model), datasets=["builtin:smoke_sft"],
        training_args=ARGS, gpu_config={"devices": "0"},
    )

    def told() -> list[str]:
        return [p["wait_reason"] for g, p in notices if g == f"task.{task.pk}" and "wait_reason" in p]

    dispatch()
    dispatch()  # nothing changed: nothing written, nothing told
    task = FinetuningTask.objects.select_related("run").get(pk=task.pk)
    assert task.wait_reason.startswith("Waiting for your GPU quota: you hold 1 of your 1 GPUs")
    assert told() == [task.wait_reason]
    quota.delete()
    dispatch()
    task = FinetuningTask.objects.select_related("run").get(pk=task.pk)
    assert task.wait_reason == "" and told()[1:] == [""]


# --- what a booking records ------------------------------------------------------------------------------
def test_a_booking_records_the_gpus_by_model_and_the_cpu_slots(alice: User) -> None:
    announce_host("mixed", "80,24", cpu=1)
    pair = waiting(alice, gpu={"count": 2})
    on_cpu = waiting(alice, gpu={"cpu": True})
    assert dispatch() == [pair.pk, on_cpu.pk]
    assert Run.objects.get(pk=pair.pk).resources == {"gpus": {"Fake GPU 24GB": 1, GPU: 1}, "cpu_slots": 0}
    assert Run.objects.get(pk=on_cpu.pk).resources == {"gpus": {}, "cpu_slots": 1}


# --- bounded cost -------------------------------------------------------------------------------------------
def _queries_of_a_dispatch_that_books_nothing(users: int) -> int:
    owners = [User.objects.create_user(f"user{i}") for i in range(users)]
    announce_host(spec="1x80", cpu=1)
    holding(owners[0])
    waiting(owners[0], gpu={"cpu": True})
    assert dispatch()  # the CPU slot is taken too
    for n, owner in enumerate(owners):
        used(owner, gpus=1, hours=n + 1)
        backlog(owner, 20)
        backlog(owner, 5, gpu={"devices": "0"}, priority=9)
        waiting(owner, lane=Lane.CPU)
    with CaptureQueriesContext(connection) as captured:
        assert dispatch() == []
    return len(captured)


@pytest.mark.django_db
def test_a_dispatch_costs_as_many_queries_for_30_users_as_for_2() -> None:
    Quota.objects.create(scope=QuotaScope.DEFAULT, max_gpus=8, gpu_hours_per_week=1000)
    two = _queries_of_a_dispatch_that_books_nothing(2)
    Run.objects.all().delete()
    User.objects.all().delete()
    thirty = _queries_of_a_dispatch_that_books_nothing(30)
    assert two == thirty, (two, thirty)
    assert thirty <= 12, thirty


def test_the_scan_cap_takes_every_users_first_runs_before_anyones_later_ones(
    alice: User, bob: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "_SCAN_CAP", 10)
    announce_host(spec="2x80")
    holding(alice, gpu={"devices": "0"})
    backlog(alice, 50, gpu={"devices": "0"}, priority=10, ago=3600)
    bobs = waiting(bob)
    assert dispatch() == [bobs.pk]


def test_a_dispatch_with_nothing_free_reads_no_queue(alice: User) -> None:
    """A full cluster dispatches on every event (each task created): it costs the inventory read only
    (and PostgreSQL's dispatch lock), however long the queue."""
    announce_host(spec="1x80")
    holding(alice)
    backlog(alice, 300)
    with CaptureQueriesContext(connection) as queries:
        assert dispatch() == []
    assert not [q["sql"] for q in queries.captured_queries if 'FROM "gpus_run"' in q["sql"]]
    assert len(queries.captured_queries) <= 6

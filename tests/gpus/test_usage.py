"""Usage accounting (``gpus.usage``): what each user's runs held, for how long, inside a window."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.utils import timezone

from gpus.models import Reservation, Run, RunKind, RunStatus
from gpus.scheduler import dispatch
from gpus.usage import (
    booked_resources,
    gpu_seconds_by_owner,
    gpus_held_by_owner,
    overlap_seconds,
    usage_by_owner,
    usage_daily,
)
from tests.conftest import announce_host

NOW = timezone.make_aware(datetime(2026, 3, 10, 12, 0))
HOUR = timedelta(hours=1)


def ran(owner: User, *, started: datetime, finished: datetime | None, gpus: dict[str, int] | None = None,
        cpu_slots: int = 0, kind: str = RunKind.TRAIN) -> Run:
    status = RunStatus.RUNNING if finished is None else RunStatus.SUCCEEDED
    return Run.objects.create(kind=kind, subject_id=0, owner=owner, status=status, started_at=started,
                              finished_at=finished, resources={"gpus": gpus or {}, "cpu_slots": cpu_slots})


def test_overlap_is_the_part_of_a_run_inside_the_window() -> None:
    assert overlap_seconds(NOW - 3 * HOUR, NOW - HOUR, NOW - 2 * HOUR, NOW) == 3600
    assert overlap_seconds(NOW - 3 * HOUR, None, NOW - 2 * HOUR, NOW) == 7200  # running: counted to the end
    assert overlap_seconds(NOW - 5 * HOUR, NOW - 4 * HOUR, NOW - 2 * HOUR, NOW) == 0
    assert overlap_seconds(NOW - HOUR, NOW + HOUR, NOW - 2 * HOUR, NOW) == 3600


def test_gpu_seconds_are_counted_per_gpu_model_inside_the_window(alice: User, bob: User) -> None:
    ran(alice, started=NOW - 3 * HOUR, finished=NOW - HOUR, gpus={"H100": 2, "A100": 1})
    ran(bob, started=NOW - 10 * HOUR, finished=NOW - 9 * HOUR, gpus={"H100": 1})  # before the window
    usage = usage_by_owner(since=NOW - 2 * HOUR, until=NOW)
    assert set(usage) == {alice.pk}
    mine = usage[alice.pk]
    assert mine.gpu_seconds == 3 * 3600 and mine.gpu_hours == 3
    assert mine.gpu_seconds_by_model == {"H100": 7200, "A100": 3600}
    assert mine.runs == {"train": 1}


def test_cpu_slot_seconds_and_runs_by_kind(alice: User) -> None:
    ran(alice, started=NOW - HOUR, finished=NOW - HOUR / 2, cpu_slots=1, kind=RunKind.EXPORT)
    ran(alice, started=NOW - HOUR, finished=NOW, gpus={"H100": 1}, kind=RunKind.DEPLOY)
    usage = usage_by_owner(since=NOW - 2 * HOUR, until=NOW)[alice.pk]
    assert usage.cpu_slot_seconds == 1800 and usage.cpu_slot_hours == 0.5
    assert usage.gpu_seconds == 3600
    assert usage.runs == {"export": 1, "deploy": 1}


def test_a_running_run_counts_up_to_now_and_a_waiting_one_not_at_all(alice: User) -> None:
    started = timezone.now() - timedelta(minutes=10)
    ran(alice, started=started, finished=None, gpus={"H100": 2})
    Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=alice, resources={"gpus": {"H100": 8}})  # pending
    seconds = usage_by_owner(since=timezone.now() - HOUR)[alice.pk].gpu_seconds
    assert 2 * 600 <= seconds <= 2 * 605


def test_runs_without_recorded_resources_count_no_gpu_time(alice: User) -> None:
    Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=alice, status=RunStatus.SUCCEEDED,
                       started_at=NOW - HOUR, finished_at=NOW)
    usage = usage_by_owner(since=NOW - 2 * HOUR, until=NOW)[alice.pk]
    assert usage.gpu_seconds == 0 and usage.runs == {"train": 1}


def test_usage_is_read_for_the_users_asked_for(alice: User, bob: User) -> None:
    ran(alice, started=NOW - HOUR, finished=NOW, gpus={"H100": 1})
    ran(bob, started=NOW - HOUR, finished=NOW, gpus={"H100": 1})
    assert set(usage_by_owner(since=NOW - 2 * HOUR, until=NOW, owner_ids=[bob.pk])) == {bob.pk}


def test_gpu_seconds_for_several_windows_at_once(alice: User, bob: User) -> None:
    ran(alice, started=NOW - 30 * HOUR, finished=NOW - 20 * HOUR, gpus={"H100": 1})
    ran(alice, started=NOW - 2 * HOUR, finished=NOW, gpus={"H100": 1, "A100": 1}, cpu_slots=1)
    ran(bob, started=NOW - 2 * HOUR, finished=NOW, cpu_slots=1)  # CPU only: no GPU time
    day, week = gpu_seconds_by_owner(windows=[NOW - 24 * HOUR, NOW - 7 * 24 * HOUR], until=NOW)
    assert day == {alice.pk: (4 * 1 + 2 * 2) * 3600}
    assert week == {alice.pk: (10 + 2 * 2) * 3600}
    assert gpu_seconds_by_owner(windows=[]) == []


def test_daily_buckets_split_a_run_at_midnight_and_list_empty_days(alice: User, bob: User, settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"
    tz = timezone.get_current_timezone()

    def at(day: int, hour: int) -> datetime:
        return timezone.make_aware(datetime(2026, 3, day, hour), tz)

    ran(alice, started=at(8, 22), finished=at(9, 2), gpus={"H100": 2}, cpu_slots=0)
    ran(alice, started=at(10, 23), finished=None, cpu_slots=1)
    ran(bob, started=at(9, 12), finished=at(9, 13), gpus={"H100": 1})
    days = usage_daily(since=at(7, 0), until=at(11, 1), owner_id=alice.pk)
    assert [d.day for d in days] == [date(2026, 3, n) for n in (7, 8, 9, 10, 11)]
    assert [d.gpu_seconds for d in days] == [0, 2 * 7200, 2 * 7200, 0, 0]
    assert [d.cpu_slot_seconds for d in days] == [0, 0, 0, 3600, 3600]  # running: counted to ``until``
    everyone = usage_daily(since=at(9, 0), until=at(9, 23))
    assert [d.gpu_seconds for d in everyone] == [2 * 7200 + 3600]


def test_gpus_held_counts_the_gpus_of_booked_and_running_runs(alice: User, bob: User) -> None:
    announce_host(spec="4x80", cpu=1)
    pair = Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=alice, gpu_config={"count": 2})
    one = Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=bob, gpu_config={"count": 1})
    on_cpu = Run.objects.create(kind=RunKind.TRAIN, subject_id=0, owner=bob, gpu_config={"cpu": True})
    assert sorted(dispatch()) == sorted([pair.pk, one.pk, on_cpu.pk])
    Run.objects.filter(pk=pair.pk).update(status=RunStatus.RUNNING)
    assert gpus_held_by_owner() == {alice.pk: 2, bob.pk: 1}
    assert gpus_held_by_owner(owner_ids=[bob.pk]) == {bob.pk: 1}
    Run.objects.filter(pk=one.pk).update(status=RunStatus.SUCCEEDED)
    Reservation.objects.filter(run=one.pk).delete()
    assert gpus_held_by_owner() == {alice.pk: 2}


def test_booked_resources_count_gpus_by_model() -> None:
    assert booked_resources(["H100", "A100", "H100"], 0) == {"gpus": {"H100": 2, "A100": 1}, "cpu_slots": 0}
    assert booked_resources([], 1) == {"gpus": {}, "cpu_slots": 1}

"""Runs with known resources and times, at a fixed "now", so every usage figure can be worked out by
hand (see :func:`alice_runs`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from accounts.models import Quota, QuotaScope
from gpus.models import Run, RunKind, RunStatus
from tasks.models import FinetuningTask, TaskStatus

#: Wednesday 11 March 2026, noon UTC: the week began on Monday the 9th, the month on the 1st, the
#: rolling 7 days on Wednesday the 4th at noon.
NOW = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)


def at(day: int, hour: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, 0, tzinfo=UTC)


def make_run(owner: User, started: datetime, finished: datetime | None, *, gpus: dict[str, int] | None = None,
             cpu_slots: int = 0, kind: str = RunKind.TRAIN) -> Run:
    status = RunStatus.RUNNING if finished is None else RunStatus.SUCCEEDED
    return Run.objects.create(
        kind=kind, subject_id=1, owner=owner, status=status, started_at=started, finished_at=finished,
        resources={"gpus": gpus or {}, "cpu_slots": cpu_slots},
    )


def make_task(owner: User, *, name: str = "t", output_bytes: int = 0, status: str = TaskStatus.COMPLETED,
              **fields: Any) -> FinetuningTask:
    return FinetuningTask.objects.create(
        owner=owner, name=name, base_model="m", model_path="m", status=status, output_bytes=output_bytes, **fields
    )


def set_quota(user: User, **limits: Any) -> Quota:
    quota, _ = Quota.objects.update_or_create(scope=QuotaScope.USER, user=user, defaults=limits)
    return quota


@pytest.fixture
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """``timezone.now()`` is :data:`NOW` (the pages and the API read the clock)."""
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    return NOW


@pytest.fixture
def alice_runs(alice: User, bob: User) -> dict[str, Any]:
    """Alice's runs, and what they add up to at :data:`NOW`:

    * 2×H100 on Tue 10th 10:00–13:00: 6 GPU-h (week, month, rolling);
    * 1×A100 on Sun 8th 22:00 – Mon 9th 02:00: 4 GPU-h, 2 of them this week (the rest last week);
    * 1×H100 on Sat 28 Feb 20:00 – Sun 1st 04:00: 4 GPU-h this month (4 in February), none in the week
      or the rolling 7 days;
    * an export on 2 CPU slots, Tue 3rd 12:00 – Thu 5th 12:00: 96 CPU-slot hours this month, 48 of
      them in the rolling 7 days (from the 4th, noon), none this week;
    * a deployment on 1×H100 since 11:00 today, still serving: 1 GPU-h so far.

    Bob's one run (2 GPU-h on the 10th) must never show in Alice's figures.
    """
    make_run(alice, at(10, 10), at(10, 13), gpus={"H100": 2})
    make_run(alice, at(8, 22), at(9, 2), gpus={"A100": 1})
    make_run(alice, at(28, 20, month=2), at(1, 4), gpus={"H100": 1})
    make_run(alice, at(3, 12), at(5, 12), cpu_slots=2, kind=RunKind.EXPORT)
    make_run(alice, at(11, 11), None, gpus={"H100": 1}, kind=RunKind.DEPLOY)
    make_run(bob, at(10, 0), at(10, 2), gpus={"H100": 1})
    return {
        "week": {"gpu_hours": 9.0, "by_model": {"A100": 2.0, "H100": 7.0}, "cpu_slot_hours": 0.0,
                 "training_runs": 2, "export_runs": 0, "deployment_runs": 1},
        "month": {"gpu_hours": 15.0, "by_model": {"A100": 4.0, "H100": 11.0}, "cpu_slot_hours": 96.0,
                  "training_runs": 3, "export_runs": 1, "deployment_runs": 1},
        "rolling_7d": {"gpu_hours": 11.0, "by_model": {"A100": 4.0, "H100": 7.0}, "cpu_slot_hours": 48.0,
                       "training_runs": 2, "export_runs": 1, "deployment_runs": 1},
    }

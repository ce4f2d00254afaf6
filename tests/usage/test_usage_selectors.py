"""The usage reports' figures, worked out by hand from runs with known resources and times
(``conftest.alice_runs``): calendar week and month boundaries, the rolling 7 days, per GPU model,
per day, storage and the quotas next to their current figures."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus.models import RunKind
from tasks.models import TaskStatus
from tests.usage.conftest import NOW, at, make_run, make_task, set_quota
from usage.selectors import usage_periods, usage_report, usage_sort, usage_staff_report, user_usage_rows

pytestmark = pytest.mark.django_db


def window_figures(window: Any) -> dict[str, Any]:
    return {
        "gpu_hours": pytest.approx(window.gpu_hours),
        "by_model": {model: pytest.approx(hours) for model, hours in window.gpu_hours_by_model.items()},
        "cpu_slot_hours": pytest.approx(window.cpu_slot_hours),
        "training_runs": window.training_runs,
        "export_runs": window.export_runs,
        "deployment_runs": window.deployment_runs,
    }


def test_the_windows_are_the_calendar_week_the_calendar_month_and_the_rolling_7_days() -> None:
    periods = usage_periods(now=NOW)
    assert periods.week_since == at(9)  # Monday 00:00
    assert periods.month_since == at(1)
    assert periods.rolling_since == at(4, 12)
    assert periods.daily_since == at(10, month=2)  # 30 days, today included


def test_the_calendar_windows_start_at_midnight_in_the_server_time_zone() -> None:
    with timezone.override("Asia/Shanghai"):  # UTC+8: Wednesday 20:00 there
        periods = usage_periods(now=NOW)
    assert periods.week_since == at(8, 16)  # Monday 9th 00:00 in Shanghai
    assert periods.month_since == at(28, 16, month=2)
    assert periods.rolling_since == at(4, 12)  # rolling: no time zone involved


def test_alices_week_month_and_rolling_7_days_count_only_the_parts_of_her_runs_inside_them(
    alice: User, alice_runs: dict[str, Any]
) -> None:
    report = usage_report(user=alice, now=NOW)
    assert window_figures(report.week) == alice_runs["week"]
    assert window_figures(report.month) == alice_runs["month"]
    assert window_figures(report.rolling_7d) == alice_runs["rolling_7d"]


def test_the_gpu_model_breakdown_lists_each_model_in_each_window(alice: User, alice_runs: dict[str, Any]) -> None:
    report = usage_report(user=alice, now=NOW)
    rows = {row.model: (row.gpu_hours_week, row.gpu_hours_month, row.gpu_hours_rolling_7d)
            for row in report.gpu_models}
    assert rows == {"A100": pytest.approx((2.0, 4.0, 4.0)), "H100": pytest.approx((7.0, 11.0, 7.0))}


def test_the_daily_series_has_30_days_and_splits_runs_at_midnight(alice: User, alice_runs: dict[str, Any]) -> None:
    daily = {day.day: (day.gpu_seconds / 3600, day.cpu_slot_seconds / 3600)
             for day in usage_report(user=alice, now=NOW).daily}
    assert len(daily) == 30 and min(daily) == date(2026, 2, 10) and max(daily) == date(2026, 3, 11)
    assert daily[date(2026, 2, 28)] == pytest.approx((4.0, 0.0))
    assert daily[date(2026, 3, 1)] == pytest.approx((4.0, 0.0))
    assert daily[date(2026, 3, 3)] == pytest.approx((0.0, 24.0))
    assert daily[date(2026, 3, 4)] == pytest.approx((0.0, 48.0))
    assert daily[date(2026, 3, 5)] == pytest.approx((0.0, 24.0))
    assert daily[date(2026, 3, 8)] == pytest.approx((2.0, 0.0))
    assert daily[date(2026, 3, 9)] == pytest.approx((2.0, 0.0))
    assert daily[date(2026, 3, 10)] == pytest.approx((6.0, 0.0))  # Bob's 2 GPU-h that day are not hers
    assert daily[date(2026, 3, 11)] == pytest.approx((1.0, 0.0))  # the deployment, up to now
    assert sum(gpu for gpu, _cpu in daily.values()) == pytest.approx(19.0)


def test_each_quota_is_shown_with_its_current_figure_and_no_limit_is_none(alice: User, alice_runs: dict[str, Any],
                                                                         settings: Any) -> None:
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 0
    set_quota(alice, gpu_hours_per_week=10, max_deployments=2, max_storage_gb=5)
    make_task(alice, name="big", output_bytes=3 * 10**9)
    make_task(alice, name="waiting", status=TaskStatus.PENDING)
    make_task(alice, name="handed over", status=TaskStatus.QUEUED)
    quotas = usage_report(user=alice, now=NOW).figures.quota_map
    assert quotas["gpu_hours_per_week"].limit == 10
    assert quotas["gpu_hours_per_week"].used == pytest.approx(11.0)  # the rolling 7 days, not the week
    assert quotas["gpu_hours_per_week"].reached and quotas["gpu_hours_per_week"].bar_percent == 100
    assert (quotas["max_deployments"].used, quotas["max_deployments"].percent) == (1, 50)
    assert not quotas["max_deployments"].reached
    assert quotas["max_storage_gb"].used == pytest.approx(3.0) and quotas["max_storage_gb"].bar_percent == 60
    assert quotas["max_waiting_tasks"].used == 2 and quotas["max_waiting_tasks"].limit is None
    assert quotas["max_gpus"].limit is None and quotas["max_gpus"].percent is None and not quotas["max_gpus"].reached


def test_a_new_user_has_an_empty_report_that_says_so(alice: User) -> None:
    report = usage_report(user=alice, now=NOW)
    assert not report.has_usage
    assert report.week.gpu_hours == 0 and report.gpu_models == [] and report.storage_bytes == 0
    assert len(report.daily) == 30 and not any(day.gpu_seconds for day in report.daily)
    assert [quota.name for quota in report.quotas] == [
        "max_waiting_tasks", "max_gpus", "gpu_hours_per_week", "max_deployments", "max_storage_gb"
    ]


def test_the_staff_report_has_a_row_for_each_user_with_usage_or_storage(
    alice: User, bob: User, staff: User, alice_runs: dict[str, Any]
) -> None:
    carol = User.objects.create_user("carol", password="x")
    make_task(carol, name="stored", output_bytes=10**9)
    User.objects.create_user("dave", password="x")  # nothing at all: no row
    report = usage_staff_report(now=NOW)
    rows = {row.username: row for row in report.rows}
    assert set(rows) == {"alice", "bob", "carol"}
    assert [row.username for row in report.rows] == ["alice", "bob", "carol"]  # GPU-hours this month, largest first
    assert rows["alice"].month.gpu_hours == pytest.approx(15.0)
    assert rows["bob"].week.gpu_hours == pytest.approx(2.0)
    assert rows["carol"].storage_bytes == 10**9 and rows["carol"].month.gpu_hours == 0
    assert {row.model: row.gpu_hours_week for row in report.gpu_models} == {"A100": pytest.approx(2.0),
                                                                            "H100": pytest.approx(9.0)}
    assert sum(day.gpu_seconds for day in report.daily) / 3600 == pytest.approx(21.0)
    assert [task.name for task in report.largest_outputs] == ["stored"]


def test_the_staff_report_sorts_by_a_known_key_and_falls_back_to_the_default(
    alice: User, bob: User, alice_runs: dict[str, Any]
) -> None:
    assert [row.username for row in usage_staff_report(sort="user", now=NOW).rows] == ["alice", "bob"]
    assert [row.username for row in usage_staff_report(sort="-user", now=NOW).rows] == ["bob", "alice"]
    assert [row.username for row in usage_staff_report(sort="gpu_week", now=NOW).rows] == ["bob", "alice"]
    assert usage_sort("--user") == usage_sort("nonsense") == usage_sort(None) == "-gpu_month"


def users_with_usage(count: int, *, start: int = 0) -> list[User]:
    """``count`` users, each with runs of every kind, an output, a waiting task and a quota."""
    users = []
    for n in range(start, start + count):
        user = User.objects.create_user(f"user{n:02}", password="x")
        make_run(user, at(10, 1), at(10, 3), gpus={"H100": 1})
        make_run(user, at(2, 1), at(2, 2), cpu_slots=1, kind=RunKind.EXPORT)
        make_run(user, at(11, 10), None, gpus={"A100": 1}, kind=RunKind.DEPLOY)
        make_task(user, name=f"out{n}", output_bytes=(n + 1) * 10**6)
        make_task(user, name=f"wait{n}", status=TaskStatus.PENDING)
        set_quota(user, gpu_hours_per_week=1)
        users.append(user)
    return users


def _queries(call: Any) -> int:
    with CaptureQueriesContext(connection) as queries:
        call()
    return len(queries)


def test_the_staff_report_takes_as_many_queries_for_20_users_as_for_2(db: None) -> None:
    users_with_usage(2)
    two = _queries(lambda: usage_staff_report(now=NOW))
    users_with_usage(18, start=2)
    twenty = _queries(lambda: usage_staff_report(now=NOW))
    assert len(usage_staff_report(now=NOW).rows) == 20
    assert two == twenty


def test_figures_for_given_users_include_those_without_usage_in_the_order_given(
    alice: User, bob: User, alice_runs: dict[str, Any]
) -> None:
    carol = User.objects.create_user("carol", password="x")
    periods = usage_periods(now=NOW)
    rows = user_usage_rows(user_ids=[carol.pk, alice.pk], periods=periods)
    assert [row.username for row in rows] == ["carol", "alice"]
    assert rows[0].month.gpu_hours == 0 and rows[1].month.gpu_hours == pytest.approx(15.0)
    assert isinstance(periods.now, datetime)

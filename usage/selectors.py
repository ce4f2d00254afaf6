"""Usage reports: what a user's runs used (this week, this month, the rolling 7 days the GPU-hour
quota counts, a daily series), their storage, and each quota next to its current figure; and the
same for every user at once, for staff.

Three windows, each labelled on the pages and in the API:

* **this week**: from Monday 00:00 in the server's time zone (``TIME_ZONE``) to now;
* **this month**: from the 1st, 00:00 local time, to now;
* **last 7 days**: the rolling ``now − 7 days`` window the ``gpu_hours_per_week`` quota counts
  (``accounts.Quota``); it is *not* the calendar week.

Every figure comes from ``gpus.usage`` (runs' booked resources × their real start and end times),
from the tasks' measured storage (``tasks.selectors.storage_by_owner``) and from the resolved
limits (``accounts.services.quota_limits_for``). Every function here reads in a constant number of
queries whatever the number of users: each source is read once, for all the users concerned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from accounts.services import Limits, quota_limits_for
from gpus.models import RunKind
from gpus.usage import DayUsage, Usage, active_deployments_by_owner, gpus_held_by_owner, usage_by_windows, usage_daily
from tasks.models import FinetuningTask
from tasks.quotas import WAITING_STATUSES
from tasks.selectors import largest_outputs, storage_by_owner

#: Days the daily series covers (today included).
DAILY_DAYS = 30
#: What the quota's "per week" means: a rolling window ending now.
ROLLING_WINDOW = timedelta(days=7)
#: Rows of the staff report's "largest outputs".
LARGEST_OUTPUTS = 50
GB = 10**9


# --- windows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Periods:
    """The windows of a report, all ending at the same ``now``."""

    now: datetime
    week_since: datetime
    month_since: datetime
    rolling_since: datetime
    daily_since: datetime


def usage_periods(*, now: datetime | None = None) -> Periods:
    """This week (Monday 00:00 local), this month (the 1st, 00:00 local), the rolling 7 days and the
    start of the daily series (00:00 local, ``DAILY_DAYS - 1`` days ago), all up to ``now``."""
    now = now or timezone.now()
    tz = timezone.get_current_timezone()
    today = timezone.localtime(now, tz).date()

    def midnight(day: Any) -> datetime:
        return timezone.make_aware(datetime.combine(day, time.min), tz)

    return Periods(
        now=now,
        week_since=midnight(today - timedelta(days=today.weekday())),
        month_since=midnight(today.replace(day=1)),
        rolling_since=now - ROLLING_WINDOW,
        daily_since=midnight(today - timedelta(days=DAILY_DAYS - 1)),
    )


@dataclass(frozen=True)
class Window:
    """One user's use of the platform in ``[since, until)``."""

    since: datetime
    until: datetime
    usage: Usage = field(default_factory=Usage)

    @property
    def gpu_seconds(self) -> float:
        return self.usage.gpu_seconds

    @property
    def gpu_hours(self) -> float:
        return self.usage.gpu_hours

    @property
    def gpu_hours_by_model(self) -> dict[str, float]:
        return {model: seconds / 3600 for model, seconds in sorted(self.usage.gpu_seconds_by_model.items())}

    @property
    def cpu_slot_seconds(self) -> float:
        return self.usage.cpu_slot_seconds

    @property
    def cpu_slot_hours(self) -> float:
        return self.usage.cpu_slot_hours

    @property
    def training_runs(self) -> int:
        """Training runs that ran in the window (a resumed task counts once per run)."""
        return self.usage.runs.get(RunKind.TRAIN, 0)

    @property
    def export_runs(self) -> int:
        return self.usage.runs.get(RunKind.EXPORT, 0)

    @property
    def deployment_runs(self) -> int:
        return self.usage.runs.get(RunKind.DEPLOY, 0)


# --- quotas -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuotaUse:
    """One quota of a user next to what the user uses now, both in the quota's ``unit``."""

    name: str  # the ``accounts.Quota`` field (``QuotaExceeded.quota`` names the same)
    label: Any  # translatable, for pages
    unit: str  # "tasks", "GPUs", "GPU-hours", "deployments", "GB"
    limit: float | None  # None: no limit
    used: float

    @property
    def percent(self) -> float | None:
        """``used`` as a percentage of ``limit`` (may pass 100); None without a limit."""
        if self.limit is None:
            return None
        if self.limit <= 0:
            return 100.0
        return self.used / self.limit * 100

    @property
    def bar_percent(self) -> int:
        """The progress bar's width (0–100)."""
        return round(min(self.percent or 0.0, 100.0))

    @property
    def reached(self) -> bool:
        """Used up: a new request of this kind would be refused (or wait, for GPU-hours)."""
        return self.limit is not None and self.used >= self.limit


QUOTA_LABELS: dict[str, tuple[Any, str]] = {
    "max_waiting_tasks": (_("Waiting tasks"), "tasks"),
    "max_gpus": (_("GPUs held at once"), "GPUs"),
    "gpu_hours_per_week": (_("GPU-hours in the last 7 days"), "GPU-hours"),
    "max_deployments": (_("Deployments running or starting"), "deployments"),
    "max_storage_gb": (_("Storage (datasets and task outputs)"), "GB"),
}


def _quota_uses(limits: Limits, *, used: dict[str, float]) -> list[QuotaUse]:
    return [
        QuotaUse(name=name, label=label, unit=unit, limit=getattr(limits, name), used=used[name])
        for name, (label, unit) in QUOTA_LABELS.items()
    ]


# --- one row of figures per user ---------------------------------------------------------------------
@dataclass(frozen=True)
class UsageFigures:
    """A user's figures: the three windows, what they hold now, storage and quotas."""

    user_id: int
    username: str
    is_staff: bool
    week: Window
    month: Window
    rolling_7d: Window
    storage_bytes: int
    gpus_held: int
    running_deployments: int
    waiting_tasks: int
    quotas: list[QuotaUse]

    @property
    def quotas_reached(self) -> list[QuotaUse]:
        return [quota for quota in self.quotas if quota.reached]

    @property
    def quota_map(self) -> dict[str, QuotaUse]:
        return {quota.name: quota for quota in self.quotas}


def _waiting_tasks_by_owner(*, owner_ids: list[int] | None) -> dict[int, int]:
    rows = FinetuningTask.objects.filter(status__in=WAITING_STATUSES, delete_requested_at__isnull=True)
    if owner_ids is not None:
        rows = rows.filter(owner_id__in=owner_ids)
    return dict(rows.order_by().values("owner_id").annotate(n=Count("id")).values_list("owner_id", "n"))


def user_usage_rows(*, user_ids: Iterable[int] | None = None, periods: Periods | None = None) -> list[UsageFigures]:
    """The figures of each user in ``user_ids`` (every one, with or without usage), or, with
    ``user_ids=None``, of every user who used something this month or in the last 7 days, holds
    something now or stores something. In the order of ``user_ids``; else by user name.

    A constant number of queries, whatever the number of users."""
    periods = periods or usage_periods()
    ids = None if user_ids is None else list(dict.fromkeys(user_ids))
    now = periods.now
    week, month, rolling = usage_by_windows(
        windows=[periods.week_since, periods.month_since, periods.rolling_since], until=now, owner_ids=ids)
    storage = storage_by_owner(owner_ids=ids)
    held = gpus_held_by_owner(owner_ids=ids)
    deployments = active_deployments_by_owner(owner_ids=ids)
    waiting = _waiting_tasks_by_owner(owner_ids=ids)
    if ids is None:
        ids = sorted(
            set(week) | set(month) | set(rolling) | set(held) | set(deployments) | set(waiting)
            | {owner for owner, size in storage.items() if size}
        )
    if not ids:
        return []
    users = {
        pk: (username, is_staff)
        for pk, username, is_staff in get_user_model().objects.filter(pk__in=ids).values_list(
            "pk", "username", "is_staff"
        )
    }
    limits = quota_limits_for(user_ids=list(users))
    rows = []
    for pk in ids:
        if pk not in users:
            continue
        rolling_usage = rolling.get(pk, Usage())
        used = {
            "max_waiting_tasks": waiting.get(pk, 0),
            "max_gpus": held.get(pk, 0),
            "gpu_hours_per_week": rolling_usage.gpu_hours,
            "max_deployments": deployments.get(pk, 0),
            "max_storage_gb": storage.get(pk, 0) / GB,
        }
        rows.append(UsageFigures(
            user_id=pk,
            username=users[pk][0],
            is_staff=users[pk][1],
            week=Window(periods.week_since, now, week.get(pk, Usage())),
            month=Window(periods.month_since, now, month.get(pk, Usage())),
            rolling_7d=Window(periods.rolling_since, now, rolling_usage),
            storage_bytes=storage.get(pk, 0),
            gpus_held=held.get(pk, 0),
            running_deployments=deployments.get(pk, 0),
            waiting_tasks=waiting.get(pk, 0),
            quotas=_quota_uses(limits.get(pk, Limits()), used=used),
        ))
    if user_ids is None:
        rows.sort(key=lambda row: row.username)
    return rows


# --- a user's report ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuModelUsage:
    model: str
    gpu_hours_week: float
    gpu_hours_month: float
    gpu_hours_rolling_7d: float


def _by_model(week: Window, month: Window, rolling: Window) -> list[GpuModelUsage]:
    models = sorted(set(week.gpu_hours_by_model) | set(month.gpu_hours_by_model) | set(rolling.gpu_hours_by_model))
    return [
        GpuModelUsage(
            model=model,
            gpu_hours_week=week.gpu_hours_by_model.get(model, 0.0),
            gpu_hours_month=month.gpu_hours_by_model.get(model, 0.0),
            gpu_hours_rolling_7d=rolling.gpu_hours_by_model.get(model, 0.0),
        )
        for model in models
    ]


@dataclass(frozen=True)
class UsageReport:
    """A user's usage page (``/usage/``) and ``GET /api/usage/``."""

    periods: Periods
    figures: UsageFigures
    daily: list[DayUsage]
    gpu_models: list[GpuModelUsage]

    @property
    def week(self) -> Window:
        return self.figures.week

    @property
    def month(self) -> Window:
        return self.figures.month

    @property
    def rolling_7d(self) -> Window:
        return self.figures.rolling_7d

    @property
    def storage_bytes(self) -> int:
        return self.figures.storage_bytes

    @property
    def quotas(self) -> list[QuotaUse]:
        return self.figures.quotas

    @property
    def has_usage(self) -> bool:
        """Anything to show beyond the quotas: time used in the last 30 days or this month, a run,
        something held or stored. A new user has none (the page says what will appear)."""
        figures = self.figures
        return bool(
            any(day.gpu_seconds or day.cpu_slot_seconds for day in self.daily)
            or figures.month.usage.runs or figures.rolling_7d.usage.runs
            or figures.storage_bytes or figures.gpus_held or figures.running_deployments or figures.waiting_tasks
        )


def usage_report(*, user: Any, now: datetime | None = None) -> UsageReport:
    """``user``'s usage report (see the module docstring for the windows)."""
    periods = usage_periods(now=now)
    figures = user_usage_rows(user_ids=[user.pk], periods=periods)[0]
    daily = usage_daily(since=periods.daily_since, until=periods.now, owner_id=user.pk)
    gpu_models = _by_model(figures.week, figures.month, figures.rolling_7d)
    return UsageReport(periods=periods, figures=figures, daily=daily, gpu_models=gpu_models)


# --- the staff report --------------------------------------------------------------------------------
#: The staff table's sort keys (``?sort=<key>``, ``-<key>`` for the largest first).
SORT_KEYS: dict[str, Callable[[UsageFigures], Any]] = {
    "user": lambda row: row.username.lower(),
    "gpu_week": lambda row: row.week.gpu_seconds,
    "gpu_month": lambda row: row.month.gpu_seconds,
    "gpu_7d": lambda row: row.rolling_7d.gpu_seconds,
    "cpu_month": lambda row: row.month.cpu_slot_seconds,
    "tasks": lambda row: row.month.training_runs,
    "deployments": lambda row: row.month.deployment_runs,
    "storage": lambda row: row.storage_bytes,
    "quotas": lambda row: len(row.quotas_reached),
}
DEFAULT_SORT = "-gpu_month"


def usage_sort(value: str | None) -> str:
    """``value`` if it names a sort key (``gpu_week``, ``-storage``…), else the default."""
    if value and value.lstrip("-") in SORT_KEYS and value.count("-") <= 1:
        return value
    return DEFAULT_SORT


@dataclass(frozen=True)
class StaffUsageReport:
    """Every user's figures (``/usage/all/``, ``GET /api/usage/users/``)."""

    periods: Periods
    rows: list[UsageFigures]
    daily: list[DayUsage]
    largest_outputs: list[FinetuningTask]
    sort: str
    gpu_models: list[GpuModelUsage]

    @property
    def totals(self) -> dict[str, float]:
        return {
            "gpu_hours_week": sum(row.week.gpu_hours for row in self.rows),
            "gpu_hours_month": sum(row.month.gpu_hours for row in self.rows),
            "gpu_hours_rolling_7d": sum(row.rolling_7d.gpu_hours for row in self.rows),
            "cpu_slot_hours_month": sum(row.month.cpu_slot_hours for row in self.rows),
            "storage_bytes": sum(row.storage_bytes for row in self.rows),
        }


def _merged_window(rows: list[UsageFigures], pick: Callable[[UsageFigures], Window], since: datetime,
                   until: datetime) -> Window:
    total = Usage()
    for row in rows:
        usage = pick(row).usage
        total.gpu_seconds += usage.gpu_seconds
        total.cpu_slot_seconds += usage.cpu_slot_seconds
        for model, seconds in usage.gpu_seconds_by_model.items():
            total.gpu_seconds_by_model[model] = total.gpu_seconds_by_model.get(model, 0.0) + seconds
    return Window(since, until, total)


def usage_staff_report(*, sort: str | None = None, now: datetime | None = None,
                       outputs: int = LARGEST_OUTPUTS) -> StaffUsageReport:
    """Every user with usage, something held or stored, sorted by ``sort`` (:data:`SORT_KEYS`),
    the daily series over everyone, GPU-hours per model over everyone, and the largest task
    outputs. A constant number of queries, whatever the number of users."""
    periods = usage_periods(now=now)
    sort = usage_sort(sort)
    rows = user_usage_rows(periods=periods)
    key = SORT_KEYS[sort.lstrip("-")]
    descending = sort.startswith("-")
    rows.sort(key=lambda row: row.username.lower())  # ties: by name
    rows.sort(key=key, reverse=descending)
    return StaffUsageReport(
        periods=periods,
        rows=rows,
        daily=usage_daily(since=periods.daily_since, until=periods.now),
        largest_outputs=[task for task in largest_outputs(limit=outputs) if task.output_bytes],
        sort=sort,
        gpu_models=_by_model(
            _merged_window(rows, lambda row: row.week, periods.week_since, periods.now),
            _merged_window(rows, lambda row: row.month, periods.month_since, periods.now),
            _merged_window(rows, lambda row: row.rolling_7d, periods.rolling_since, periods.now),
        ),
    )


def daily_chart_data(daily: list[DayUsage]) -> dict[str, list[Any]]:
    """The daily series as the page's chart reads it (``json_script``): ISO days and hours."""
    return {
        "days": [day.day.isoformat() for day in daily],
        "gpu_hours": [round(day.gpu_seconds / 3600, 3) for day in daily],
        "cpu_slot_hours": [round(day.cpu_slot_seconds / 3600, 3) for day in daily],
    }

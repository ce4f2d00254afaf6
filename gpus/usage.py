"""Usage accounting: what each user's runs held, and for how long (issue 12).

A run's usage is what it was given when it was booked (``Run.resources``: GPUs by model, CPU
slots) times the time it actually ran: from ``started_at`` (the supervisor's claim) to
``finished_at``, or to now while it still runs. A window (this week, this month, one day) counts
only the part of each run inside it. Nothing is estimated and nothing is double counted: the runs
are the truth, this module only reads them.

Runs booked before usage accounting existed have no ``resources`` and count as zero GPU time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from django.db.models import Count, Q
from django.utils import timezone

from gpus.models import RUN_HOLDING_STATUSES, Reservation, Run, RunKind


@dataclass
class Usage:
    """One user's use of the platform in a window."""

    gpu_seconds: float = 0.0
    gpu_seconds_by_model: dict[str, float] = field(default_factory=dict)
    cpu_slot_seconds: float = 0.0
    #: Runs that ran in the window, by kind (``train``, ``export``, ``deploy``).
    runs: dict[str, int] = field(default_factory=dict)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def cpu_slot_hours(self) -> float:
        return self.cpu_slot_seconds / 3600

    def add(self, resources: dict, seconds: float, kind: str) -> None:
        gpus = resources.get("gpus") or {}
        for model, count in gpus.items():
            self.gpu_seconds_by_model[model] = self.gpu_seconds_by_model.get(model, 0.0) + count * seconds
            self.gpu_seconds += count * seconds
        self.cpu_slot_seconds += (resources.get("cpu_slots") or 0) * seconds
        self.runs[kind] = self.runs.get(kind, 0) + 1


@dataclass(frozen=True)
class DayUsage:
    day: date
    gpu_seconds: float
    cpu_slot_seconds: float


def overlap_seconds(started: datetime, finished: datetime | None, since: datetime, until: datetime) -> float:
    """Seconds of ``[started, finished or until)`` inside ``[since, until)``."""
    end = min(finished or until, until)
    start = max(started, since)
    return max(0.0, (end - start).total_seconds())


def _runs_in(since: datetime, until: datetime, owner_ids: Iterable[int] | None) -> Iterable[tuple]:
    runs = Run.objects.filter(started_at__isnull=False, started_at__lt=until).filter(
        Q(finished_at__isnull=True) | Q(finished_at__gt=since)
    )
    if owner_ids is not None:
        runs = runs.filter(owner_id__in=list(owner_ids))
    return runs.order_by().values_list("owner_id", "kind", "resources", "started_at", "finished_at").iterator(
        chunk_size=2000
    )


def usage_by_windows(
    *, windows: Sequence[datetime], until: datetime | None = None, owner_ids: Iterable[int] | None = None
) -> list[dict[int, Usage]]:
    """Each user's usage in ``[since, until)`` for each ``since`` of ``windows`` (``until``: now), all
    in one query: one mapping per window, in the order given. A user with no run in a window is
    absent from its mapping."""
    if not windows:
        return []
    until = until or timezone.now()
    usages: list[dict[int, Usage]] = [defaultdict(Usage) for _ in windows]
    for owner_id, kind, resources, started, finished in _runs_in(min(windows), until, owner_ids):
        for since, usage in zip(windows, usages, strict=True):
            if finished is None or finished > since:  # the run overlaps this window too
                usage[owner_id].add(resources or {}, overlap_seconds(started, finished, since, until), kind)
    return [dict(usage) for usage in usages]


def usage_by_owner(
    *, since: datetime, until: datetime | None = None, owner_ids: Iterable[int] | None = None
) -> dict[int, Usage]:
    """Each user's usage in ``[since, until)`` (``until``: now), in one query. Users with no run in
    the window are absent."""
    return usage_by_windows(windows=[since], until=until, owner_ids=owner_ids)[0]


def gpu_seconds_by_owner(
    *, windows: Sequence[datetime], until: datetime | None = None, owner_ids: Iterable[int] | None = None
) -> list[dict[int, float]]:
    """Each user's GPU-seconds for each window of :func:`usage_by_windows` (the dispatcher needs its
    fair-share window and the rolling week); users without GPU time are absent."""
    return [{owner: usage.gpu_seconds for owner, usage in by_owner.items() if usage.gpu_seconds}
            for by_owner in usage_by_windows(windows=windows, until=until, owner_ids=owner_ids)]


def usage_daily(*, since: datetime, until: datetime | None = None, owner_id: int | None = None) -> list[DayUsage]:
    """GPU- and CPU-slot-seconds per calendar day (in the current time zone) from ``since``'s day to
    ``until``'s, every day listed (zeros included), for one user or (``owner_id=None``) everyone."""
    until = until or timezone.now()
    tz = timezone.get_current_timezone()
    first = timezone.localtime(since, tz).date()
    last = timezone.localtime(until, tz).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    bounds = [timezone.make_aware(datetime.combine(d, datetime.min.time()), tz) for d in days]
    bounds.append(bounds[-1] + timedelta(days=1))
    gpu = [0.0] * len(days)
    cpu = [0.0] * len(days)
    owners = None if owner_id is None else [owner_id]
    for _owner, _kind, resources, started, finished in _runs_in(max(since, bounds[0]), until, owners):
        gpus = sum((resources or {}).get("gpus", {}).values())
        slots = (resources or {}).get("cpu_slots") or 0
        if not gpus and not slots:
            continue
        for n in range(len(days)):
            seconds = overlap_seconds(started, finished, max(bounds[n], since), min(bounds[n + 1], until))
            gpu[n] += gpus * seconds
            cpu[n] += slots * seconds
    return [DayUsage(day=d, gpu_seconds=g, cpu_slot_seconds=c) for d, g, c in zip(days, gpu, cpu, strict=True)]


def gpus_held_by_owner(*, owner_ids: Iterable[int] | None = None) -> dict[int, int]:
    """GPUs each user's runs hold now (booked, running, or lost and not yet released)."""
    rows = Reservation.objects.filter(gpu__isnull=False, run__status__in=RUN_HOLDING_STATUSES)
    if owner_ids is not None:
        rows = rows.filter(run__owner_id__in=list(owner_ids))
    return dict(rows.order_by().values("run__owner_id").annotate(n=Count("id")).values_list("run__owner_id", "n"))


def active_deployments_by_owner(*, owner_ids: Iterable[int] | None = None) -> dict[int, int]:
    """Deployment runs each user has waiting, starting or serving."""
    rows = Run.objects.filter(kind=RunKind.DEPLOY, status__in=[*RUN_HOLDING_STATUSES, "pending"])
    if owner_ids is not None:
        rows = rows.filter(owner_id__in=list(owner_ids))
    return dict(rows.values("owner_id").annotate(n=Count("id")).values_list("owner_id", "n"))


def booked_resources(gpu_models: Iterable[str], cpu_slots: int) -> dict:
    """The ``Run.resources`` value of a booking: GPUs counted by model, and CPU slots."""
    by_model: dict[str, int] = {}
    for model in gpu_models:
        by_model[model] = by_model.get(model, 0) + 1
    return {"gpus": by_model, "cpu_slots": cpu_slots}

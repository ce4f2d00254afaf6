"""Everything that reads tasks and datasets for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.translation import gettext as _

from gpus.models import Host
from gpus.placement import UNKNOWN, GpuSlot, Request, TimedHost, earliest_start, occupy
from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric, TaskStatus


def finetuning_task_list(*, user: Any) -> QuerySet[FinetuningTask]:
    return FinetuningTask.objects.for_user(user).visible().select_related("owner").prefetch_related(
        "reservations__gpu"
    )


def finetuning_task_get(*, user: Any, pk: Any) -> FinetuningTask:
    """The user's task or 404 (another user's task does not exist for them)."""
    return get_object_or_404(finetuning_task_list(user=user), pk=pk)


def task_log_lines(*, task: FinetuningTask, after: int = 0, limit: int = 1000) -> list[TaskLogLine]:
    return list(TaskLogLine.objects.filter(task=task, seq__gt=after).order_by("seq")[:limit])


def task_metric_points(*, task: FinetuningTask, after_step: int = 0) -> QuerySet[TaskMetric]:
    return TaskMetric.objects.filter(task=task, step__gt=after_step).order_by("step", "kind")


def task_events(*, task: FinetuningTask) -> QuerySet[TaskEvent]:
    return TaskEvent.objects.filter(task=task).order_by("created_at", "id")


def dataset_list(*, user: Any) -> QuerySet[Dataset]:
    return Dataset.objects.for_user(user).select_related("owner")


def dataset_get(*, user: Any, pk: Any) -> Dataset:
    return get_object_or_404(dataset_list(user=user), pk=pk)


def dataset_find(*, user: Any, ref: str) -> Dataset | None:
    """A dataset of the user's by id or by exact name (the seed API's ``datasetPath``)."""
    qs = Dataset.objects.filter(owner=user)
    if ref.isdigit():
        return qs.filter(pk=int(ref)).first()
    return qs.filter(name=ref).order_by("-created_at").first()


# --- the live pages and their WebSockets (issue #4) ----------------------------------------------
def finetuning_task_find(*, user: Any, pk: Any) -> FinetuningTask | None:
    """The user's task or ``None`` (consumers close with 4404 instead of raising Http404)."""
    try:
        key = int(pk)
    except (TypeError, ValueError):
        return None
    return finetuning_task_list(user=user).filter(pk=key).first()


def finetuning_task_rows(*, user: Any, ids: list[int]) -> list[FinetuningTask]:
    """The user's visible tasks among ``ids`` (what a list page shows); others are left out."""
    return list(finetuning_task_list(user=user).filter(pk__in=ids))


def finetuning_task_status_counts(*, user: Any) -> dict[str, int]:
    """How many of the user's visible tasks are in each status."""
    from django.db.models import Count

    rows = finetuning_task_list(user=user).order_by().values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def task_metrics_after(*, task: FinetuningTask | int, after_id: int = 0, limit: int = 5000) -> list[TaskMetric]:
    """Metric points stored after the point with id ``after_id`` (a cursor that survives upserts)."""
    return list(TaskMetric.objects.filter(task=task, pk__gt=after_id).order_by("pk")[:limit])


def task_events_after(*, task: FinetuningTask | int, after_id: int = 0) -> list[TaskEvent]:
    """Lifecycle events recorded after the event with id ``after_id``."""
    return list(TaskEvent.objects.filter(task=task, pk__gt=after_id).order_by("pk"))


def task_checkpoints(*, task: FinetuningTask) -> list[str]:
    """The checkpoint folders under the task's output folder, oldest first (as seen from this host)."""
    import re
    from pathlib import Path

    if not task.output_path:
        return []
    output = Path(task.output_path)
    try:
        found = [p for p in output.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    except OSError:
        return []
    return [str(p) for p in sorted(found, key=lambda p: int(p.name.split("-")[1]))]


# --- the queue ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueEntry:
    """A waiting task as the queue shows it. Another user's task is shown without its name or id."""

    position: int
    task: FinetuningTask
    visible: bool
    request: Request
    estimated_start: datetime | None
    note: str


def _timed_inventory() -> list[TimedHost]:
    """Live, enabled hosts with, for each GPU and CPU slot, the seconds until it is free: 0 when
    free, the holder's ETA when a running task with an ETA holds it, unknown otherwise."""
    hosts: list[TimedHost] = []
    for host in Host.objects.live().filter(enabled=True).prefetch_related("gpus", "reservations__task"):
        timed = TimedHost(name=host.name)
        for g in host.gpus.all():
            if g.enabled and g.present:
                timed.gpus.append(GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid,
                                          memory_total_mb=g.memory_total_mb))
                timed.gpu_free_in[g.pk] = 0.0
        timed.slot_free_in = dict.fromkeys(range(host.cpu_slots), 0.0)
        for r in host.reservations.all():
            task = r.task
            free_in = UNKNOWN
            if task is not None and task.status == TaskStatus.RUNNING and task.eta_seconds is not None:
                free_in = max(0.0, task.eta_seconds)
            if r.gpu_id in timed.gpu_free_in:
                timed.gpu_free_in[r.gpu_id] = free_in
            elif r.cpu_slot is not None:
                timed.slot_free_in[r.cpu_slot] = free_in
        hosts.append(timed)
    return hosts


def queue_entries(*, user: Any) -> list[QueueEntry]:
    """Every waiting (``pending``) task in the order the dispatcher considers them, with an
    estimated start from the running tasks' ETAs (``None`` when it depends on work without one).

    The estimate walks the queue in order: each task takes the resources that free up first
    among those it can use, and keeps them (its own run time is unknown). Held tasks keep their
    position but take nothing.
    """
    now = timezone.now()
    hosts = _timed_inventory()
    entries: list[QueueEntry] = []
    waiting = FinetuningTask.objects.filter(
        status=TaskStatus.PENDING, stop_requested_at__isnull=True, delete_requested_at__isnull=True
    ).queue_order().select_related("owner")
    for position, task in enumerate(waiting, start=1):
        request = Request.from_task(task.gpu_config or {}, task.memory_estimate_gb)
        visible = bool(getattr(user, "is_staff", False) or task.owner_id == getattr(user, "pk", None))
        start: datetime | None = None
        if task.held:
            note = _("on hold")
        elif not hosts:
            note = _("no worker host is online")
        else:
            found = earliest_start(request, hosts)
            if found is None:
                note = _("does not fit on any online host")
            elif found[0] == UNKNOWN:
                note = _("waits for work without an estimated end")
            else:
                start = now + timedelta(seconds=found[0])
                note = _("next") if found[0] == 0 else _("after running tasks end")
            if found is not None:
                occupy(found[1], hosts)
        entries.append(QueueEntry(position=position, task=task, visible=visible, request=request,
                                  estimated_start=start, note=note))
    return entries

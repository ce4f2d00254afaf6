"""Everything that reads tasks and datasets for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric


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

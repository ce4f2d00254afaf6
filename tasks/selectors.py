"""Everything that reads tasks and datasets for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric


def finetuning_task_list(*, user: Any) -> QuerySet[FinetuningTask]:
    return FinetuningTask.objects.for_user(user).visible().select_related("owner")


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

"""Everything that reads deployments for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from deployments.models import Deployment, DeploymentLogLine
from tasks.models import FinetuningTask


def deployment_list(*, user: Any) -> QuerySet[Deployment]:
    return Deployment.objects.for_user(user).visible().select_related("owner", "task")


def deployment_get(*, user: Any, pk: Any) -> Deployment:
    """The user's deployment or 404 (another user's deployment does not exist for them)."""
    return get_object_or_404(deployment_list(user=user), pk=pk)


async def deployment_find(*, user: Any, pk: Any) -> Deployment | None:
    """The user's deployment or None, for async views (the gateway)."""
    try:
        key = int(pk)
    except (TypeError, ValueError):
        return None
    return await deployment_list(user=user).filter(pk=key).afirst()


def deployment_log_lines(*, deployment: Deployment, after: int = 0, limit: int = 1000) -> list[DeploymentLogLine]:
    return list(DeploymentLogLine.objects.filter(deployment=deployment, seq__gt=after).order_by("seq")[:limit])


def deployable_tasks(*, user: Any) -> QuerySet[FinetuningTask]:
    """The user's tasks that have saved a checkpoint (what the create form offers)."""
    return (FinetuningTask.objects.for_user(user).visible().exclude(last_checkpoint="")
            .order_by("-created_at").only("pk", "name", "last_checkpoint", "status", "output_path"))

"""Everything that reads deployments for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

from typing import Any

from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.shortcuts import get_object_or_404
from django.utils.translation import gettext as _

from deployments.models import Deployment, DeploymentLogLine
from gpus.models import Host
from tasks.models import FinetuningTask


def deployment_list(*, user: Any) -> QuerySet[Deployment]:
    return Deployment.objects.for_user(user).visible().select_related("owner", "task")


def deployment_get(*, user: Any, pk: Any) -> Deployment:
    """The user's deployment or 404 (another user's deployment does not exist for them)."""
    return get_object_or_404(deployment_list(user=user), pk=pk)


def deployment_gateway_list(*, user: Any) -> QuerySet[Deployment]:
    """The user's deployments as the gateway needs them: with the current run and ``host_address``,
    the address the host of that run recorded (``Host.address``; ``None`` without a host row), read
    in the same query."""
    address = Host.objects.filter(name=OuterRef("run__host")).values("address")[:1]
    return deployment_list(user=user).select_related("run").annotate(host_address=Subquery(address))


async def deployment_find(*, user: Any, pk: Any) -> Deployment | None:
    """The user's deployment or None, for async views (the playground), as the gateway needs it
    (:func:`deployment_gateway_list`)."""
    try:
        key = int(pk)
    except (TypeError, ValueError):
        return None
    return await deployment_gateway_list(user=user).filter(pk=key).afirst()


def deployment_log_lines(*, deployment: Deployment, after: int = 0, limit: int = 1000) -> list[DeploymentLogLine]:
    return list(DeploymentLogLine.objects.filter(deployment=deployment, seq__gt=after).order_by("seq")[:limit])


def deployable_tasks(*, user: Any) -> QuerySet[FinetuningTask]:
    """The user's tasks that have saved a checkpoint (what the create form offers)."""
    return (FinetuningTask.objects.for_user(user).visible().exclude(last_checkpoint="")
            .order_by("-created_at").only("pk", "name", "last_checkpoint", "status", "output_path"))


def deployments_serving_task(*, task: FinetuningTask) -> QuerySet[Deployment]:
    """The active deployments (waiting, starting or serving) of one of the task's checkpoints or merged
    models: by the task they name, or by a model folder inside its output folder."""
    uses = Q(task_id=task.pk)
    if task.output_path:
        uses |= Q(model_path__startswith=task.output_path.rstrip("/") + "/")
    return Deployment.objects.active().filter(uses).order_by("pk")


def task_outputs_guard(task: FinetuningTask) -> str | None:
    """Why the task's outputs may not be deleted now (a deployment serves one of them), for
    ``tasks.outputs.register_output_guard``; None when nothing serves them."""
    serving = list(deployments_serving_task(task=task).values_list("pk", "name")[:3])
    if not serving:
        return None
    names = ", ".join(f"#{pk} {name}" for pk, name in serving)
    return _("deployment %(names)s serves a checkpoint of this task; stop it first") % {"names": names}

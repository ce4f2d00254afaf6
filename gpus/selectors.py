"""Reads of the inventory. GPUs are shared, not owned: everyone sees every GPU, but a holder task
is named only to its owner and to staff."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet

from gpus.models import Gpu, Host, Reservation


def gpu_list() -> QuerySet[Gpu]:
    return (
        Gpu.objects.select_related("host")
        .prefetch_related(Prefetch("reservations", queryset=Reservation.objects.select_related("task")))
        .order_by("host__name", "index")
    )


def host_list() -> QuerySet[Host]:
    return Host.objects.order_by("name")


def gpu_state(gpu: Gpu) -> str:
    """``offline`` (host silent or card gone), ``draining`` (disabled but held), ``disabled``,
    ``reserved`` (held by a task), or ``free``."""
    held = bool(list(gpu.reservations.all()))
    if not gpu.present or not gpu.host.is_live:
        return "offline"
    if not gpu.enabled:
        return "draining" if held else "disabled"
    return "reserved" if held else "free"


def gpu_holder(gpu: Gpu, user: Any) -> dict[str, Any] | None:
    for reservation in gpu.reservations.all():
        task = reservation.task
        if task is None:
            continue
        if user.is_staff or task.owner_id == user.pk:
            return {"task": task.pk, "name": task.name, "status": task.status}
        return {"task": None, "name": "another user's task", "status": task.status}
    return None

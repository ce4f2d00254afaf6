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


def inventory_snapshot() -> list[Any]:
    """Live, enabled hosts with their enabled GPUs and what is free now (for placement)."""
    from gpus.placement import GpuSlot, HostState

    states = []
    for host in Host.objects.live().filter(enabled=True).prefetch_related("gpus", "reservations"):
        gpus = [GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid, memory_total_mb=g.memory_total_mb)
                for g in host.gpus.all() if g.enabled and g.present]
        held_gpus = {r.gpu_id for r in host.reservations.all() if r.gpu_id}
        held_slots = {r.cpu_slot for r in host.reservations.all() if r.cpu_slot is not None}
        states.append(HostState(
            name=host.name, gpus=gpus, free_gpu_ids={g.id for g in gpus} - held_gpus, cpu_slots=host.cpu_slots,
            free_cpu_slots=[s for s in range(host.cpu_slots) if s not in held_slots],
        ))
    return states


def task_gpu_memory_usage(task: Any) -> dict[str, dict[str, int]]:
    """``{index: {memory_used, memory_total, utilization}}`` (MiB, %) of the GPUs a task holds —
    the seed's ``gpu_memory_usage`` — from its reservations, or from the devices it named on its host."""
    # Through the relation, so a list prefetched by tasks.selectors.finetuning_task_list costs no query.
    gpus = [r.gpu for r in task.reservations.all() if r.gpu_id is not None]
    if not gpus and task.host and (task.gpu_config or {}).get("devices"):
        wanted = str(task.gpu_config["devices"]).split(",")
        gpus = [g for g in Gpu.objects.filter(host__name=task.host) if str(g.index) in wanted or g.uuid in wanted]
    return {
        str(g.index): {"memory_used": g.memory_used_mb, "memory_total": g.memory_total_mb,
                       "utilization": g.utilization_pct}
        for g in gpus
    }

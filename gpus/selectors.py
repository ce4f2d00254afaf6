"""Reads of the inventory. GPUs are shared, not owned: everyone sees every GPU, but a holder task
is named only to its owner and to staff."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet

from gpus.models import Gpu, Host, Reservation


def gpu_list() -> QuerySet[Gpu]:
    return (
        Gpu.objects.select_related("host")
        .prefetch_related(
            Prefetch("reservations", queryset=Reservation.objects.select_related("task", "deployment"))
        )
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
    """The task or deployment holding a GPU: named to its owner and staff, anonymous to others."""
    for reservation in gpu.reservations.all():
        holder = reservation.task or reservation.deployment
        if holder is None:
            continue
        kind = "task" if reservation.task_id else "deployment"
        if user.is_staff or holder.owner_id == user.pk:
            return {"kind": kind, kind: holder.pk, "name": holder.name, "status": holder.status}
        return {"kind": kind, kind: None, "name": f"another user's {kind}", "status": holder.status}
    return None


def inventory_snapshot(*, everything: bool = False) -> list[Any]:
    """Live, enabled hosts with their enabled GPUs and what is free now (for placement).

    ``everything``: every known host and present GPU, live or not, enabled or draining — what the
    platform *has*, to decide whether a request could ever run (a drained GPU or a restarting
    worker must not turn a request into "impossible")."""
    from gpus.placement import GpuSlot, HostState

    states = []
    hosts = Host.objects.all() if everything else Host.objects.live().filter(enabled=True)
    for host in hosts.prefetch_related("gpus", "reservations"):
        gpus = [GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid, memory_total_mb=g.memory_total_mb)
                for g in host.gpus.all() if g.present and (g.enabled or everything)]
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

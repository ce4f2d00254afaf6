"""Reads of the inventory. GPUs are shared, not owned: everyone sees every GPU, but a holder task
is named only to its owner and to staff. The GPUs and queue pages and their socket render
:func:`gpu_overview` (the queue page is the tasks app's: ``tasks.selectors.queue_overview``)."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet
from django.utils.translation import gettext as _
from django.utils.translation import gettext_noop

from gpus.models import Gpu, Host, Reservation, Run
from gpus.placement import GpuSlot, HostState
from gpus.workloads import workload_for


def gpu_list() -> QuerySet[Gpu]:
    # The host through a prefetch (one query), not a join: its liveness comes from the database's clock.
    return (
        Gpu.objects.prefetch_related(
            Prefetch("host", queryset=Host.objects.with_silence()),
            Prefetch("reservations", queryset=Reservation.objects.select_related("run")),
        )
        .order_by("host__name", "index")
    )


def host_list() -> QuerySet[Host]:
    """Every host, with how long it has been silent by the database's clock (``is_live``)."""
    return Host.objects.with_silence().order_by("name")


def gpu_state(gpu: Gpu) -> str:
    """``offline`` (host silent or card gone), ``draining`` (disabled but held), ``disabled``,
    ``reserved`` (held by a task), or ``free``."""
    held = bool(list(gpu.reservations.all()))
    if not gpu.present or not gpu.host.is_live:
        return "offline"
    if not gpu.enabled:
        return "draining" if held else "disabled"
    return "reserved" if held else "free"


def reservation_holder(reservation: Reservation, user: Any) -> dict[str, Any] | None:
    """The run behind a reservation, in its workload's words: named to its owner and staff,
    anonymous to others."""
    return workload_for(reservation.run.kind).holder(reservation.run, user)


def gpu_holder(gpu: Gpu, user: Any, holders: dict[int, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Who holds a GPU, by the rule of :func:`reservation_holder` (from ``holders``, as
    :func:`run_holders` read them, when given)."""
    for reservation in gpu.reservations.all():
        if holders is not None and reservation.run_id in holders:
            return holders[reservation.run_id]
        return reservation_holder(reservation, user)
    return None


def run_holders(reservations: list[Reservation], user: Any) -> dict[int, dict[str, Any]]:
    """The holders of many reservations, one query per kind of run (keyed by run id)."""
    by_kind: dict[str, dict[int, Run]] = {}
    for reservation in reservations:
        by_kind.setdefault(reservation.run.kind, {})[reservation.run_id] = reservation.run
    holders: dict[int, dict[str, Any]] = {}
    for kind, runs in by_kind.items():
        holders.update(workload_for(kind).holders(list(runs.values()), user))
    return holders


def inventory_snapshot(*, everything: bool = False) -> list[Any]:
    """Live, enabled hosts with their enabled GPUs and what is free now (for placement).

    ``everything``: every known host and present GPU, live or not, enabled or draining — what the
    platform *has*, to decide whether a request could ever run (a drained GPU or a restarting
    worker must not turn a request into "impossible")."""
    states = []
    # A host known only by its worker's name claim (its agent has not reported yet) has no known
    # inventory: counting it as "a host with nothing" would refuse requests while a worker starts.
    hosts = Host.objects.filter(last_seen_at__isnull=False) if everything else Host.objects.live().filter(enabled=True)
    for host in hosts.prefetch_related("gpus", "reservations"):
        gpus = [GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid, memory_total_mb=g.memory_total_mb,
                        name=g.name)
                for g in host.gpus.all() if g.present and (g.enabled or everything)]
        held_gpus = {r.gpu_id for r in host.reservations.all() if r.gpu_id}
        held_slots = {r.cpu_slot for r in host.reservations.all() if r.cpu_slot is not None}
        states.append(HostState(
            name=host.name, id=host.pk, gpus=gpus, free_gpu_ids={g.id for g in gpus} - held_gpus,
            cpu_slots=host.cpu_slots,
            free_cpu_slots=[s for s in range(host.cpu_slots) if s not in held_slots],
        ))
    return states


def run_gpu_memory_usage(run: Run | None, gpu_config: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """``{index: {memory_used, memory_total, utilization}}`` (MiB, %) of the GPUs a run holds —
    the seed's ``gpu_memory_usage`` — from its reservations, or from the devices it named on its host."""
    if run is None:
        return {}
    # Through the relation, so a prefetched list costs no query.
    gpus = [r.gpu for r in run.reservations.all() if r.gpu_id is not None]
    devices = (gpu_config if gpu_config is not None else run.gpu_config or {}).get("devices")
    if not gpus and run.host and devices:
        wanted = str(devices).split(",")
        gpus = [g for g in Gpu.objects.filter(host__name=run.host) if str(g.index) in wanted or g.uuid in wanted]
    return {
        str(g.index): {"memory_used": g.memory_used_mb, "memory_total": g.memory_total_mb,
                       "utilization": g.utilization_pct}
        for g in gpus
    }


def apply_reserved_gpus(env: dict[str, str], run: Run) -> list[str]:
    """Show a process exactly the GPUs the scheduler reserved for its run: their UUIDs (NVML
    indices can differ from the CUDA order and across reboots) in index order; a CPU slot hides
    every GPU. Returns the UUIDs."""
    reserved = sorted((r for r in run.reservations.select_related("gpu") if r.gpu_id), key=lambda r: r.gpu.index)
    devices = [r.gpu.uuid for r in reserved]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if devices:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return devices


# --- payloads ------------------------------------------------------------------------------------
_ANONYMOUS = {"task": gettext_noop("another user's task"), "deployment": gettext_noop("another user's deployment"),
              "export": gettext_noop("another user's export")}


def _holder_payload(holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """``gpu_holder``'s answer for a page: a link for the owner and staff, translated words otherwise."""
    if holder is None:
        return None
    kind = holder["kind"]
    name = holder["name"] if holder.get("id") is not None else _(_ANONYMOUS.get(kind, "another user's run"))
    return {**holder, "name": name, "status_label": holder.get("status_label") or holder["status"]}


def _gpu_payload(gpu: Gpu, user: Any, holders: dict[int, dict[str, Any]]) -> dict[str, Any]:
    total = gpu.memory_total_mb
    return {
        "id": gpu.pk,
        "index": gpu.index,
        "name": gpu.name,
        "uuid": gpu.uuid,
        "memory_used_mb": gpu.memory_used_mb,
        "memory_total_mb": total,
        "memory_used_gb": round(gpu.memory_used_mb / 1024, 1),
        "memory_total_gb": round(total / 1024, 1),
        "memory_pct": round(min(100.0, 100.0 * gpu.memory_used_mb / total), 1) if total else 0.0,
        "utilization_pct": gpu.utilization_pct,
        "temperature_c": gpu.temperature_c,
        "enabled": gpu.enabled,
        "present": gpu.present,
        "state": gpu_state(gpu),
        "holder": _holder_payload(gpu_holder(gpu, user, holders)),
    }


def gpu_overview(*, user: Any) -> list[dict[str, Any]]:
    """Every host (by name) with its GPUs (by index), their state and holder, and its CPU slots."""
    by_host: dict[int, list[Gpu]] = {}
    gpus = list(gpu_list())
    for gpu in gpus:
        by_host.setdefault(gpu.host_id, []).append(gpu)
    slot_reservations = Reservation.objects.filter(cpu_slot__isnull=False).select_related("run")
    hosts: list[Host] = list(
        host_list().prefetch_related(
            Prefetch("reservations", queryset=slot_reservations, to_attr="slot_reservations")
        )
    )
    holders = run_holders([r for gpu in gpus for r in gpu.reservations.all()]
                          + [r for host in hosts for r in host.slot_reservations], user)
    overview = []
    for host in hosts:
        held = {r.cpu_slot: r for r in host.slot_reservations}
        slots = []
        for slot in range(host.cpu_slots):
            reservation = held.get(slot)
            holder = holders.get(reservation.run_id) if reservation is not None else None
            slots.append({"slot": slot, "holder": _holder_payload(holder)})
        overview.append({
            "name": host.name,
            "live": host.is_live,
            "enabled": host.enabled,
            "last_seen": host.last_seen_at,
            "seen_seconds_ago": max(0, round(host.silent_seconds)) if host.silent_seconds is not None else None,
            "backend": host.gpu_backend,
            "error": host.gpu_error,
            "cpu_slots": slots,
            "cpu_held": sum(1 for s in slots if s["holder"] is not None),
            "gpus": [_gpu_payload(gpu, user, holders) for gpu in by_host.get(host.pk, [])],
        })
    return overview

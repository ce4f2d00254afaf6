"""Reads of the inventory. GPUs are shared, not owned: everyone sees every GPU, but a holder task
is named only to its owner and to staff. The GPUs and queue pages and their socket render
:func:`gpu_overview` and :func:`queue_overview`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from gpus.models import Gpu, Host, Reservation


def gpu_list() -> QuerySet[Gpu]:
    # The host through a prefetch (one query), not a join: its liveness comes from the database's clock.
    return (
        Gpu.objects.prefetch_related(
            Prefetch("host", queryset=Host.objects.with_silence()),
            Prefetch("reservations", queryset=Reservation.objects.select_related("task", "deployment")),
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
    """The task or deployment behind a reservation: named to its owner and staff, anonymous to others."""
    holder = reservation.task or reservation.deployment
    if holder is None:
        return None
    kind = "task" if reservation.task_id else "deployment"
    if user.is_staff or holder.owner_id == user.pk:
        return {"kind": kind, kind: holder.pk, "name": holder.name, "status": holder.status}
    return {"kind": kind, kind: None, "name": f"another user's {kind}", "status": holder.status}


def gpu_holder(gpu: Gpu, user: Any) -> dict[str, Any] | None:
    """Who holds a GPU, by the rule of :func:`reservation_holder`."""
    for reservation in gpu.reservations.all():
        holder = reservation_holder(reservation, user)
        if holder is not None:
            return holder
    return None


def inventory_snapshot(*, everything: bool = False) -> list[Any]:
    """Live, enabled hosts with their enabled GPUs and what is free now (for placement).

    ``everything``: every known host and present GPU, live or not, enabled or draining — what the
    platform *has*, to decide whether a request could ever run (a drained GPU or a restarting
    worker must not turn a request into "impossible")."""
    from gpus.placement import GpuSlot, HostState

    states = []
    # A host known only by its worker's name claim (its agent has not reported yet) has no known
    # inventory: counting it as "a host with nothing" would refuse requests while a worker starts.
    hosts = Host.objects.filter(last_seen_at__isnull=False) if everything else Host.objects.live().filter(enabled=True)
    for host in hosts.prefetch_related("gpus", "reservations"):
        gpus = [GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid, memory_total_mb=g.memory_total_mb)
                for g in host.gpus.all() if g.present and (g.enabled or everything)]
        held_gpus = {r.gpu_id for r in host.reservations.all() if r.gpu_id}
        held_slots = {r.cpu_slot for r in host.reservations.all() if r.cpu_slot is not None}
        states.append(HostState(
            name=host.name, id=host.pk, gpus=gpus, free_gpu_ids={g.id for g in gpus} - held_gpus,
            cpu_slots=host.cpu_slots,
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


# --- payloads ------------------------------------------------------------------------------------
def _holder_url(kind: str, pk: int) -> str | None:
    try:
        return reverse("task_detail" if kind == "task" else "deployment_detail", args=[pk])
    except NoReverseMatch:
        return None


def _status_label(kind: str, status: str) -> str:
    from deployments.models import DeploymentStatus
    from tasks.models import TaskStatus

    choices = TaskStatus.choices if kind == "task" else DeploymentStatus.choices
    return str(dict(choices).get(status, status))


def _holder_payload(holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """``gpu_holder``'s answer for a page: a link for the owner and staff, translated words otherwise."""
    if holder is None:
        return None
    kind = holder["kind"]
    pk = holder.get(kind)
    if pk is None:
        name = _("another user's task") if kind == "task" else _("another user's deployment")
    else:
        name = holder["name"]
    return {
        "kind": kind,
        "id": pk,
        "name": name,
        "status": holder["status"],
        "status_label": _status_label(kind, holder["status"]),
        "url": _holder_url(kind, pk) if pk is not None else None,
    }


def _gpu_payload(gpu: Gpu, user: Any) -> dict[str, Any]:
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
        "holder": _holder_payload(gpu_holder(gpu, user)),
    }


def gpu_overview(*, user: Any) -> list[dict[str, Any]]:
    """Every host (by name) with its GPUs (by index), their state and holder, and its CPU slots."""
    by_host: dict[int, list[Gpu]] = {}
    for gpu in gpu_list():
        by_host.setdefault(gpu.host_id, []).append(gpu)
    slot_reservations = Reservation.objects.filter(cpu_slot__isnull=False).select_related("task", "deployment")
    hosts: list[Host] = list(
        host_list().prefetch_related(
            Prefetch("reservations", queryset=slot_reservations, to_attr="slot_reservations")
        )
    )
    overview = []
    for host in hosts:
        held = {r.cpu_slot: r for r in host.slot_reservations}
        slots = []
        for slot in range(host.cpu_slots):
            reservation = held.get(slot)
            holder = reservation_holder(reservation, user) if reservation is not None else None
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
            "gpus": [_gpu_payload(gpu, user) for gpu in by_host.get(host.pk, [])],
        })
    return overview


def request_label(kind: str, count: int, devices: list[str], min_memory_gb: float) -> str:
    """What a waiting task asked for, in words: ``2 × GPU, ≥ 40 GiB each``, ``GPU 0,1``, ``CPU slot``."""
    if kind == "cpu":
        return _("a CPU slot")
    if kind == "auto":
        text = _("one GPU, or a CPU slot on a host without GPUs")
    elif devices:
        text = _("GPU %(devices)s") % {"devices": ",".join(devices)}
    else:
        text = _("%(n)s × GPU") % {"n": count}
    if min_memory_gb:
        text += " · " + _("≥ %(gb)s GiB each") % {"gb": f"{min_memory_gb:g}"}
    return text


def _to_minute(moment: datetime | None) -> datetime | None:
    """An estimate to the minute: the page says "in ~12 min", and a start time that moves by
    seconds on every read must not count as a change."""
    if moment is None:
        return None
    return (moment + timedelta(seconds=30)).replace(second=0, microsecond=0)


def queue_overview(*, user: Any) -> list[dict[str, Any]]:
    """The waiting tasks in dispatch order (``queue_entries``), as the queue page shows them."""
    from tasks.selectors import queue_entries

    now = timezone.now()
    entries = []
    for entry in queue_entries(user=user):
        task, r = entry.task, entry.request
        count = r.count if r.kind == "gpu" else (0 if r.kind == "cpu" else 1)
        min_memory_gb = round(r.min_memory_mb / 1024, 1)
        start = _to_minute(entry.estimated_start)
        entries.append({
            "position": entry.position,
            "visible": entry.visible,
            "id": task.pk if entry.visible else None,
            "name": task.name if entry.visible else _("another user's task"),
            "owner": task.owner.get_username() if entry.visible else None,
            "mine": task.owner_id == user.pk,
            "url": reverse("task_detail", args=[task.pk]) if entry.visible else None,
            "priority": task.priority,
            "held": task.held,
            "created_at": task.created_at,
            "waited_seconds": max(0, round((now - task.created_at).total_seconds())),
            "request": {"kind": r.kind, "count": count, "devices": list(r.devices), "min_memory_gb": min_memory_gb},
            "request_label": request_label(r.kind, count, list(r.devices), min_memory_gb),
            "estimated_start": start,
            "starts_in_seconds": max(0, round((start - now).total_seconds())) if start else None,
            "note": str(entry.note),
        })
    return entries


def starts_in_text(seconds: float | None) -> str:
    """``None`` → empty (the page shows the note instead); ``90`` → ``in ~2 min``; ``5400`` →
    ``in ~1 h 30 min``. Mirrored by ``static/js/queue.js``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return _("within a minute")
    minutes = int(seconds / 60 + 0.5)
    if minutes < 60:
        return _("in ~%(m)s min") % {"m": minutes}
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return _("in ~%(h)s h %(m)s min") % {"h": hours, "m": minutes}
    return _("in ~%(d)s d %(h)s h") % {"d": hours // 24, "h": hours % 24}

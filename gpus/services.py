"""Everything that changes the inventory: announcing a host's GPUs, enabling and draining them."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from gpus.inventory import Discovery
from gpus.models import Gpu, Host, Reservation

logger = logging.getLogger(__name__)


def default_cpu_slots(discovery: Discovery) -> int:
    """``FINETUNE_CPU_SLOTS`` if set; else 1 on a host without GPUs and 0 on a GPU host."""
    if settings.FINETUNE_CPU_SLOTS is not None:
        return settings.FINETUNE_CPU_SLOTS
    return 0 if discovery.gpus else 1


def host_announce(*, name: str, discovery: Discovery, cpu_slots: int) -> bool:
    """Record what a host's agent discovered. Returns True when capacity appeared (the host was
    new or came back, or a GPU appeared), which is a reason to dispatch."""
    now = timezone.now()
    with transaction.atomic():
        host, created = Host.objects.get_or_create(name=name)
        came_back = created or not host.is_live or host.cpu_slots < cpu_slots
        host.gpu_backend = discovery.backend
        host.gpu_error = discovery.error
        host.cpu_slots = cpu_slots
        host.last_seen_at = now
        host.save(update_fields=["gpu_backend", "gpu_error", "cpu_slots", "last_seen_at"])
        seen: set[str] = set()
        appeared = False
        for info in discovery.gpus:
            seen.add(info.uuid)
            gpu = Gpu.objects.filter(uuid=info.uuid).first()
            if gpu is None or not gpu.present or gpu.host_id != host.pk:
                appeared = True
            if gpu is None:
                # A card moved to another index (or the index was reused): free the index first.
                Gpu.objects.filter(host=host, index=info.index).exclude(uuid=info.uuid).update(
                    index=1000 + info.index, present=False
                )
                gpu = Gpu(uuid=info.uuid, host=host, index=info.index)
            gpu.host, gpu.index, gpu.name, gpu.present = host, info.index, info.name, True
            gpu.memory_total_mb, gpu.memory_used_mb = info.memory_total_mb, info.memory_used_mb
            gpu.utilization_pct, gpu.temperature_c, gpu.processes = (
                info.utilization_pct,
                info.temperature_c,
                info.processes,
            )
            gpu.save()
        Gpu.objects.filter(host=host).exclude(uuid__in=seen).update(present=False)
    return came_back or appeared


def gpu_set_enabled(*, gpu: Gpu, enabled: bool) -> Gpu:
    """Enable a GPU, or disable (drain) it: a draining GPU takes no new task; its current task
    finishes. Enabling frees capacity, so the queue is dispatched."""
    Gpu.objects.filter(pk=gpu.pk).update(enabled=enabled)
    gpu.refresh_from_db()
    if enabled:
        from tasks.scheduler import dispatch_on_commit

        dispatch_on_commit()
    return gpu


def reservations_release(*, task_id: int | None = None, deployment_id: int | None = None) -> int:
    """Free everything a task or a deployment holds. Returns how many reservations went; the
    caller dispatches (after commit) so the freed resources go to the queue."""
    if (task_id is None) == (deployment_id is None):
        raise ValueError("name exactly one holder")
    holder = {"task_id": task_id} if task_id is not None else {"deployment_id": deployment_id}
    deleted, _ = Reservation.objects.filter(**holder).delete()
    return deleted


def reservations_release_orphans() -> int:
    """Safety net for the sweep: delete reservations whose holder has ended (a code path that
    forgot to release would otherwise block a GPU forever). Returns how many went."""
    from deployments.models import DEPLOYMENT_ACTIVE_STATUSES
    from tasks.models import TaskStatus

    orphans = Reservation.objects.filter(
        models.Q(task__isnull=False) & ~models.Q(task__status__in=[TaskStatus.QUEUED, TaskStatus.RUNNING])
        | models.Q(deployment__isnull=False) & ~models.Q(deployment__status__in=DEPLOYMENT_ACTIVE_STATUSES)
    )
    deleted, _ = orphans.delete()
    if deleted:
        logger.warning("released %d reservation(s) whose holder had ended", deleted)
    return deleted

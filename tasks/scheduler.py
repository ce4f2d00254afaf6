"""The dispatcher: which waiting work starts next, on which GPUs, and handing it to that host's worker.

The rule (documented for users in docs/architecture.md, "The queue"):

1. **Deployments first**, oldest first: they are interactive and small in number.
2. **Tasks in queue order**: larger ``priority`` first (0-10), then first come, first served.
   ``held`` tasks keep their place but are skipped.
3. **Backfill**: when a task does not fit on the free GPUs / CPU slots, later tasks that do fit may
   start past it — until the blocked task has waited ``FINETUNE_BACKFILL_MAX_WAIT_SECONDS``
   (default 600 s). From then on the resources it will need (the best fit among *all* enabled
   GPUs of the live hosts, whoever holds them now) are fenced: later tasks may only use what is
   outside the fence, so as running tasks end, the fenced GPUs free up for the blocked task and it
   cannot starve. ``0`` gives strict order (no backfill at all).
4. Everything a task runs on is a :class:`gpus.models.Reservation` row, created in the same
   transaction that moves the task ``pending → queued`` and enqueues its job on the queue of the
   host that holds the GPUs. Unique constraints make a double booking impossible even if two
   dispatchers raced; they do not race, because dispatch is serialised (a transaction-scoped
   advisory lock on PostgreSQL, the IMMEDIATE transaction mode on SQLite).

Dispatch runs on events — a task was created, a task or deployment ended, a GPU was enabled, a
priority changed, a task was released from hold, a host (re)appeared — and from the periodic sweep
as a safety net. A rolled-back dispatch enqueues nothing; a committed one cannot lose its job
(the django-q2 ORM broker writes its row in the same transaction).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django_q.tasks import async_task

from finetune_platform.queues import host_queue
from gpus.models import Reservation
from gpus.placement import HostState, Placement, Request, place, take
from gpus.selectors import inventory_snapshot
from tasks.models import EventKind, FinetuningTask, TaskStatus
from tasks.publisher import publish_event

logger = logging.getLogger(__name__)

_DISPATCH_LOCK = 0x46_54_50_01  # "FTP" 1: any constant shared by every process
# How many waiting tasks one dispatch looks at (the queue is walked in order; the rest wait).
_SCAN_LIMIT = 500


def dispatch_lock() -> None:
    """Serialise dispatchers for the rest of the current transaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_DISPATCH_LOCK])


def worker_queue(host: str) -> str:
    return host_queue(settings.Q_CLUSTER["name"], host)


def enqueue_run(task_id: int, host: str) -> None:
    """Hand a queued task to ``host``'s worker (runner.run_task claims it atomically)."""
    async_task("tasks.jobs.run_task", task_id, task_name=f"run-task-{task_id}", ack_failure=True,
               cluster=worker_queue(host))


@dataclass
class DispatchResult:
    tasks: list[int]
    deployments: list[int]


def dispatch_pending() -> list[int]:
    """Start whatever fits now; returns the ids of the tasks moved to ``queued``."""
    return dispatch().tasks


def dispatch() -> DispatchResult:
    result = DispatchResult(tasks=[], deployments=[])
    with transaction.atomic():
        dispatch_lock()
        hosts = inventory_snapshot()
        if hosts:
            result.deployments = _place_deployments(hosts)
            result.tasks = _place_tasks(hosts)
    return result


# --- tasks ----------------------------------------------------------------------------------------
def _place_tasks(hosts: list[HostState]) -> list[int]:
    now = timezone.now()
    max_wait = timedelta(seconds=settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS)
    fence = _Fence(hosts)
    queued: list[int] = []
    waiting = (
        FinetuningTask.objects.filter(
            status=TaskStatus.PENDING, held=False, stop_requested_at__isnull=True, delete_requested_at__isnull=True
        )
        .queue_order()
        .only("pk", "gpu_config", "memory_estimate_gb", "created_at")[:_SCAN_LIMIT]
    )
    for task in list(waiting):
        if not fence.has_free():
            break
        request = Request.from_task(task.gpu_config or {}, task.memory_estimate_gb)
        placement = place(request, hosts)
        if placement is None:
            if now - task.created_at >= max_wait:
                fence.keep_for(request)
            continue
        if _book_task(task.pk, placement, hosts, now):
            take(placement, hosts)
            queued.append(task.pk)
    return queued


def _book_task(task_id: int, placement: Placement, hosts: list[HostState], now: Any) -> bool:
    port = _free_master_port(placement.host)
    try:
        with transaction.atomic():
            moved = FinetuningTask.objects.filter(
                pk=task_id, status=TaskStatus.PENDING, held=False, stop_requested_at__isnull=True
            ).update(status=TaskStatus.QUEUED, queued_at=now, host=placement.host, master_port=port)
            if not moved:
                return False
            _reserve(placement, hosts, task_id=task_id)
            enqueue_run(task_id, placement.host)
            # Recorded in the booking transaction, so the timeline always reads queued → started
            # (the worker may claim the task a moment after the commit, before code after it runs).
            gpus = sorted(g.index for h in hosts if h.name == placement.host for g in h.gpus
                          if g.id in placement.gpu_ids)
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "a CPU slot"
            publish_event(FinetuningTask.objects.get(pk=task_id), EventKind.QUEUED,
                          f"Reserved {where} on {placement.host}; handed to its worker", host=placement.host,
                          gpus=gpus)
    except IntegrityError:  # only if the inventory changed under us; the next dispatch retries
        logger.warning("reservation for task %s collided; it stays pending", task_id, exc_info=True)
        return False
    return True


def _free_master_port(host: str) -> int:
    """The lowest rendezvous port no active task on ``host`` uses (multi-GPU runs need one each)."""
    used = set(
        FinetuningTask.objects.filter(
            host=host, status__in=[TaskStatus.QUEUED, TaskStatus.RUNNING], master_port__isnull=False
        ).values_list("master_port", flat=True)
    )
    port = settings.FINETUNE_MASTER_PORT_BASE
    while port in used:
        port += 1
    return port


def _reserve(placement: Placement, hosts: list[HostState], **holder: int) -> None:
    (host_id,) = [h.id for h in hosts if h.name == placement.host]
    rows = [Reservation(host_id=host_id, gpu_id=gpu_id, **holder) for gpu_id in placement.gpu_ids]
    if placement.cpu_slot is not None:
        rows.append(Reservation(host_id=host_id, cpu_slot=placement.cpu_slot, **holder))
    Reservation.objects.bulk_create(rows)


class _Fence:
    """Resources kept for blocked tasks that waited too long (the anti-starvation half of backfill).

    ``keep_for`` places the request on the whole capacity (free or held by someone now) minus
    what is already fenced, and removes that placement's resources from the free snapshot, so no
    later task can take them.
    """

    def __init__(self, hosts: list[HostState]) -> None:
        self.hosts = hosts
        self.fenced_gpus: set[int] = set()
        self.fenced_slots: set[tuple[str, int]] = set()

    def has_free(self) -> bool:
        return any(h.free_gpu_ids or h.free_cpu_slots for h in self.hosts)

    def keep_for(self, request: Request) -> None:
        capacity = [
            HostState(
                name=h.name, id=h.id, gpus=h.gpus, free_gpu_ids={g.id for g in h.gpus} - self.fenced_gpus,
                cpu_slots=h.cpu_slots,
                free_cpu_slots=[s for s in range(h.cpu_slots) if (h.name, s) not in self.fenced_slots],
            )
            for h in self.hosts
        ]
        target = place(request, capacity)
        if target is None:
            return
        self.fenced_gpus |= set(target.gpu_ids)
        for host in self.hosts:
            if host.name != target.host:
                continue
            host.free_gpu_ids -= set(target.gpu_ids)
            if target.cpu_slot is not None:
                self.fenced_slots.add((host.name, target.cpu_slot))
                if target.cpu_slot in host.free_cpu_slots:
                    host.free_cpu_slots.remove(target.cpu_slot)


# --- deployments ----------------------------------------------------------------------------------
def _place_deployments(hosts: list[HostState]) -> list[int]:
    from deployments.models import Deployment, DeploymentStatus

    placed: list[int] = []
    for deployment in list(Deployment.objects.waiting().only("pk", "gpu_config", "memory_estimate_gb")[:50]):
        request = Request.from_task(deployment.gpu_config or {}, deployment.memory_estimate_gb)
        placement = place(request, hosts)
        if placement is None:
            continue
        try:
            with transaction.atomic():
                moved = Deployment.objects.filter(
                    pk=deployment.pk, status=DeploymentStatus.PENDING, host="", stop_requested_at__isnull=True
                ).update(host=placement.host)
                if not moved:
                    continue
                _reserve(placement, hosts, deployment_id=deployment.pk)
                async_task("deployments.jobs.run_deployment", deployment.pk, task_name=f"deploy-{deployment.pk}",
                           ack_failure=True, cluster=worker_queue(placement.host))
        except IntegrityError:
            logger.warning("reservation for deployment %s collided; it stays pending", deployment.pk, exc_info=True)
            continue
        take(placement, hosts)
        placed.append(deployment.pk)
    return placed


# --- events and the safety net ------------------------------------------------------------------
def dispatch_on_commit() -> None:
    """Dispatch once the current transaction commits (or now, outside one)."""
    transaction.on_commit(_safe_dispatch)


def _safe_dispatch() -> None:
    try:
        dispatch()
    except Exception:  # noqa: BLE001 - the periodic sweep retries; never fail the caller's request
        logger.exception("dispatch failed; the periodic sweep will retry")


def task_requeue(*, task: FinetuningTask, reason: str) -> bool:
    """Put a queued task that no worker has claimed back to ``pending`` (its reservations released),
    so the dispatcher places it again. False if it was no longer queued."""
    with transaction.atomic():
        moved = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
            status=TaskStatus.PENDING, host="", master_port=None, queued_at=None
        )
        if moved:
            Reservation.objects.filter(task_id=task.pk).delete()
    if moved:
        publish_event(task, EventKind.REQUEUED, reason)
    return bool(moved)


def requeue_stranded() -> list[int]:
    """Put queued tasks whose host went silent before its worker claimed them back in the queue
    (their reservations are released), so they can start elsewhere. Returns their ids."""
    from gpus.models import Host

    live = set(Host.objects.live().values_list("name", flat=True))
    return [
        task.pk
        for task in FinetuningTask.objects.filter(status=TaskStatus.QUEUED).exclude(host__in=live)
        if task_requeue(task=task, reason=f"Host {task.host} stopped reporting before it started the task; "
                        "back in the queue")
    ]

"""The dispatcher: which waiting work starts next, on which GPUs, and handing it to that host's worker.

The rule (documented for users in docs/architecture.md, "The queue"):

Waiting :class:`gpus.models.Run` rows are served by lane (:class:`gpus.models.Lane`), whatever asked
for them (the scheduler imports no task or deployment: their workloads are registered in
:mod:`gpus.workloads`):

1. **Deployments first**, oldest first: they are interactive and small in number.
2. **Training in queue order**: larger ``priority`` first (0-10), then first come, first served.
   ``held`` runs keep their place but are skipped.
3. **Backfill**: when a task does not fit on the free GPUs / CPU slots, later tasks that do fit may
   start past it — until the blocked task has waited ``FINETUNE_BACKFILL_MAX_WAIT_SECONDS``
   (default 600 s). From then on the resources it will need (the best fit among *all* enabled
   GPUs of the live hosts, whoever holds them now) are fenced: later tasks may only use what is
   outside the fence, so as running tasks end, the fenced GPUs free up for the blocked task and it
   cannot starve. ``0`` gives strict order (no backfill at all).
4. **Exports** (the CPU lane) last: each books a CPU slot of a live host.
5. Everything a run runs on is a :class:`gpus.models.Reservation` row, created in the same
   transaction that moves the run ``pending → queued`` and enqueues its job on the queue of the
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
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django_q.tasks import async_task

from core.live.publish import publish
from core.queues import host_queue
from gpus.models import RUN_HOLDING_STATUSES, Lane, Reservation, Run, RunStatus
from gpus.placement import HostState, Placement, Request, place, take
from gpus.selectors import inventory_snapshot
from gpus.workloads import workload_for

logger = logging.getLogger(__name__)

_DISPATCH_LOCK = 0x46_54_50_01  # "FTP" 1: any constant shared by every process
# How many waiting runs one dispatch looks at (the queue is walked in order; the rest wait).
_SCAN_LIMIT = 500
#: The job every host's worker runs for a run of any kind.
RUN_JOB = "gpus.jobs.run"
#: Where a change of the inventory (readings, reservations, enabled cards) is announced: the GPUs page.
INVENTORY_GROUP = "gpus"


def inventory_changed() -> None:
    """Announce that reservations or cards changed (in the caller's transaction, if any)."""
    publish(INVENTORY_GROUP, {"changed": True})


def dispatch_lock() -> None:
    """Serialise dispatchers for the rest of the current transaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_DISPATCH_LOCK])


def worker_queue(host: str) -> str:
    return host_queue(settings.Q_CLUSTER["name"], host)


def enqueue_run(run: Run) -> None:
    """Hand a queued run to its host's worker (the supervisor claims it atomically)."""
    async_task(RUN_JOB, run.pk, task_name=f"run-{run.kind}-{run.subject_id}-{run.pk}", ack_failure=True,
               cluster=worker_queue(run.host))


def dispatch() -> list[int]:
    """Start whatever fits now; returns the ids of the runs moved to ``queued``."""
    with transaction.atomic():
        dispatch_lock()
        hosts = inventory_snapshot()
        if not hosts:
            return []
        now = timezone.now()
        max_wait = timedelta(seconds=settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS)
        fence = _Fence(hosts)
        queued: list[int] = []
        waiting = Run.objects.waiting().only(
            "pk", "kind", "subject_id", "lane", "gpu_config", "memory_estimate_gb", "created_at", "owner_id", "label",
        )[:_SCAN_LIMIT]
        for run in list(waiting):
            if not fence.has_free():
                break
            request = Request.from_task({"cpu": True} if run.lane == Lane.CPU else (run.gpu_config or {}),
                                        run.memory_estimate_gb)
            placement = place(request, hosts)
            if placement is None:
                # Backfill's fence keeps resources for a training run that waited too long; a
                # deployment or an export never blocks the lanes after it.
                if run.lane == Lane.TRAIN and now - run.created_at >= max_wait:
                    fence.keep_for(request)
                continue
            if _book(run, placement, hosts, now):
                take(placement, hosts)
                queued.append(run.pk)
        if queued:
            inventory_changed()
    return queued


def _book(run: Run, placement: Placement, hosts: list[HostState], now: Any) -> bool:
    port = _free_master_port(placement.host) if run.lane == Lane.TRAIN else None
    try:
        with transaction.atomic():
            moved = Run.objects.filter(
                pk=run.pk, status=RunStatus.PENDING, held=False, stop_requested_at__isnull=True
            ).update(status=RunStatus.QUEUED, queued_at=now, host=placement.host, master_port=port)
            if not moved:
                return False
            run.status, run.queued_at, run.host, run.master_port = RunStatus.QUEUED, now, placement.host, port
            _reserve(placement, hosts, run_id=run.pk)
            enqueue_run(run)
            # In the booking transaction, so the subject's timeline always reads queued → started
            # (the worker may claim the run a moment after the commit, before code after it runs).
            gpus = sorted(g.index for h in hosts if h.name == placement.host for g in h.gpus
                          if g.id in placement.gpu_ids)
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "a CPU slot"
            workload_for(run.kind).booked(run, f"{where} on {placement.host}")
    except IntegrityError:  # only if the inventory changed under us; the next dispatch retries
        logger.warning("reservation for run %s collided; it stays pending", run.pk, exc_info=True)
        return False
    return True


def _free_master_port(host: str) -> int:
    """The lowest rendezvous port no active run on ``host`` uses (multi-GPU runs need one each)."""
    used = set(
        Run.objects.filter(host=host, status__in=RUN_HOLDING_STATUSES, master_port__isnull=False)
        .values_list("master_port", flat=True)
    )
    port = settings.FINETUNE_MASTER_PORT_BASE
    while port in used:
        port += 1
    return port


def _reserve(placement: Placement, hosts: list[HostState], *, run_id: int) -> None:
    (host_id,) = [h.id for h in hosts if h.name == placement.host]
    rows = [Reservation(host_id=host_id, gpu_id=gpu_id, run_id=run_id) for gpu_id in placement.gpu_ids]
    if placement.cpu_slot is not None:
        rows.append(Reservation(host_id=host_id, cpu_slot=placement.cpu_slot, run_id=run_id))
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


# --- events and the safety net ------------------------------------------------------------------
def dispatch_on_commit() -> None:
    """Dispatch once the current transaction commits (or now, outside one)."""
    transaction.on_commit(_safe_dispatch)


def _safe_dispatch() -> None:
    try:
        dispatch()
    except Exception:  # noqa: BLE001 - the periodic sweep retries; never fail the caller's request
        logger.exception("dispatch failed; the periodic sweep will retry")


def run_requeue(*, run: Run, reason: str, quiet: bool = False, dispatch_now: bool = True) -> bool:
    """Put a queued run that no supervisor has claimed back to ``pending`` (its reservations
    released), so the dispatcher places it again. False if it was no longer queued. ``quiet``: the
    caller tells the subject itself (its workload is not told). ``dispatch_now=False``: leave it to
    the next dispatch (a worker shutting down must not be handed it again at once)."""
    with transaction.atomic():
        moved = Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
            status=RunStatus.PENDING, host="", master_port=None, queued_at=None
        )
        if moved:
            Reservation.objects.filter(run_id=run.pk).delete()
            inventory_changed()
            run.status, run.host, run.master_port, run.queued_at = RunStatus.PENDING, "", None, None
            if not quiet:
                workload_for(run.kind).requeued(run, reason)
    if moved and dispatch_now:
        dispatch_on_commit()
    return bool(moved)

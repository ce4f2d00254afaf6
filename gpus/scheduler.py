"""The dispatcher: which waiting work starts next, on which GPUs, and handing it to that host's worker.

The rule (documented for users in docs/architecture.md, "The queue"):

Waiting :class:`gpus.models.Run` rows are served by lane (:class:`gpus.models.Lane`), whatever asked
for them (the scheduler imports no task or deployment: their workloads are registered in
:mod:`gpus.workloads`):

1. **Deployments first**: they are interactive and small in number.
2. **Training**: larger ``priority`` first (0-10). ``held`` runs keep their place but are skipped.
3. **Exports** (the CPU lane) last: each books a CPU slot of a live host.

**Fair share within the same lane and priority.** Among the waiting runs of one (lane, priority)
the next one is that of the user with the least recent usage:

a. the fewest GPUs held right now (booked, running or lost runs; counted again after each booking
   of this dispatch, so users interleave within one pass: A, B, A, B, …), then
b. the fewest GPU-seconds used over the last ``FINETUNE_FAIRSHARE_WINDOW_HOURS`` (default 168 h;
   running runs counted up to now; see :mod:`gpus.usage`), then
c. first come, first served (the run's ``created_at``, then its id).

A user's own runs always keep their order (priority, then age). The scan never lets one user's
backlog hide another's runnable run: a dispatch reads, for each user and lane, that user's first
``_SCAN_PER_OWNER`` (100) waiting runs in queue order (``ROW_NUMBER() OVER (PARTITION BY owner,
lane …)``), at most ``_SCAN_CAP`` in all, every user's first runs before anyone's later ones — a
constant number of queries however many users and runs wait. (A user's runs past their first 100
in a lane are seen once earlier ones start: a backlog can hide its owner's later runs, no one else's.)

**Quota gates** (:func:`accounts.services.quota_limits_for`; only runs that take GPUs, so exports on a
CPU slot are never gated):

* ``max_gpus``: a run whose GPUs plus those its owner holds (bookings of this dispatch included)
  would pass the limit waits;
* ``gpu_hours_per_week``: once its owner's GPU-hours over the last 7 days (rolling, running runs
  counted up to now) reach the limit, their GPU runs wait; running work is not stopped, and the
  periodic sweep's dispatch starts them as older use leaves the window.

A run held back by a quota neither books nor fences anything and blocks no one; its
``Run.wait_reason`` says which quota and the current usage in a sentence, written only when it
changes (one bulk update) and cleared when the quota no longer holds it back or it is booked; each
change is told to its subject (:meth:`gpus.workloads.Workload.waiting`), whose page shows it. A
dispatch with no free GPU or CPU slot anywhere reads nothing (reasons are written by the next one
that has room: until then every run waits for resources anyway).

**Backfill**: when a training run does not fit on the free GPUs / CPU slots, runs after it that do fit
may start past it — until the blocked run has waited ``FINETUNE_BACKFILL_MAX_WAIT_SECONDS`` (default
600 s). From then on the resources it will need (the best fit among *all* enabled GPUs of the live
hosts, whoever holds them now) are fenced: later runs may only use what is outside the fence, so as
running work ends, the fenced GPUs free up for the blocked run and it cannot starve. ``0`` gives strict
order (no backfill at all). A deployment or an export that does not fit never fences.

Everything a run runs on is a :class:`gpus.models.Reservation` row, created in the same transaction
that moves the run ``pending → queued`` (recording what it was given in ``Run.resources``: GPUs by
model, CPU slots) and enqueues its job on the queue of the host that holds the GPUs. Unique
constraints make a double booking impossible even if two dispatchers raced; they do not race,
because dispatch is serialised (a transaction-scoped advisory lock on PostgreSQL, the IMMEDIATE
transaction mode on SQLite).

Dispatch runs on events — a task was created, a task or deployment ended, a GPU was enabled, a
priority changed, a task was released from hold, a host (re)appeared — and from the periodic sweep
as a safety net. A rolled-back dispatch enqueues nothing; a committed one cannot lose its job
(the django-q2 ORM broker writes its row in the same transaction).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from heapq import heapify, heappop, heappush
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.utils import timezone
from django_q.tasks import async_task

from accounts.services import Limits, quota_limits_for
from core.live.publish import publish
from core.queues import host_queue
from gpus.models import RUN_HOLDING_STATUSES, Lane, Reservation, Run, RunStatus
from gpus.placement import HostState, Placement, Request, TimedHost, place, take
from gpus.selectors import inventory_snapshot
from gpus.usage import booked_resources, gpu_seconds_by_owner, gpus_held_by_owner
from gpus.workloads import workload_for

logger = logging.getLogger(__name__)

_DISPATCH_LOCK = 0x46_54_50_01  # "FTP" 1: any constant shared by every process
#: How many waiting runs of each user, in each lane, one dispatch looks at (in queue order).
_SCAN_PER_OWNER = 100
#: How many waiting runs one dispatch looks at in all (each user's first runs before anyone's later ones).
_SCAN_CAP = 5000
#: The rolling window of the ``gpu_hours_per_week`` quota.
QUOTA_WEEK = timedelta(days=7)
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
        if not any(h.free_gpu_ids or h.free_cpu_slots for h in hosts):
            # Nothing can start: the queue is not read (a full cluster with a long queue dispatches on
            # every event). Wait reasons are brought up to date by the next dispatch that has room.
            return []
        runs = _scan()
        if not runs:
            return []
        now = timezone.now()
        max_wait = timedelta(seconds=settings.FINETUNE_BACKFILL_MAX_WAIT_SECONDS)
        shares = _shares({run.owner_id for run in runs}, now)
        fence = _Fence(hosts)
        queued: list[int] = []
        reasons: dict[int, tuple[Run, str]] = {}
        for run in _fair_order(runs, shares):
            share = shares[run.owner_id]
            request = _request(run)
            reason = share.quota_reason(request.gpu_count(hosts))
            reasons[run.pk] = (run, reason)
            if reason or not fence.has_free():
                continue  # a quota holds it back: it fences nothing and blocks no one
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
                share.held += len(placement.gpu_ids)
                del reasons[run.pk]  # booking cleared it
        _write_wait_reasons(reasons.values())
        if queued:
            inventory_changed()
    return queued


def _scan() -> list[Run]:
    """The waiting runs one dispatch considers: each user's first ``_SCAN_PER_OWNER`` of each lane in
    queue order (one query), so no backlog hides another user's run."""
    ranked = Run.objects.waiting().annotate(
        owner_rank=Window(RowNumber(), partition_by=[F("owner_id"), F("lane")],
                          order_by=[F("priority").desc(), F("created_at").asc(), F("id").asc()]),
    ).filter(owner_rank__lte=_SCAN_PER_OWNER).only(
        "pk", "kind", "subject_id", "lane", "priority", "gpu_config", "memory_estimate_gb", "created_at",
        "owner_id", "label", "wait_reason",
    ).order_by("owner_rank", "lane", "-priority", "created_at", "id")
    return list(ranked[:_SCAN_CAP])


@dataclass
class _Share:
    """One user's standing in a dispatch: what orders their runs among others' and gates them."""

    limits: Limits
    held: int = 0  # GPUs held now, bookings of this dispatch included
    recent_gpu_seconds: float = 0.0  # over the fair-share window
    week_gpu_seconds: float = 0.0  # over the quota's rolling week

    def rank(self, run: Run) -> tuple[int, float, datetime, int]:
        return (self.held, self.recent_gpu_seconds, run.created_at, run.pk)

    def quota_reason(self, gpus: int) -> str:
        """Why a run needing ``gpus`` GPUs must wait for a quota, in words for its owner; "" if none."""
        if not gpus:
            return ""  # a CPU slot uses no GPU quota
        hours_limit = self.limits.gpu_hours_per_week
        used = self.week_gpu_seconds / 3600
        if hours_limit is not None and used >= hours_limit:
            return (f"Waiting for your GPU-hour quota: {used:.1f} of {hours_limit:g} GPU-hours used in the last 7 "
                    "days (gpu_hours_per_week); it starts as older use leaves the window.")
        max_gpus = self.limits.max_gpus
        if max_gpus is not None and self.held + gpus > max_gpus:
            if gpus > max_gpus:
                return (f"Waiting for your GPU quota: this needs {gpus} GPUs, more than your {max_gpus} "
                        "(max_gpus); it cannot start unless the quota is raised.")
            return (f"Waiting for your GPU quota: you hold {self.held} of your {max_gpus} GPUs and this needs "
                    f"{gpus} (max_gpus).")
        return ""


def _shares(owner_ids: set[int], now: datetime) -> dict[int, _Share]:
    """Limits, GPUs held and recent GPU time of these users (a fixed number of queries)."""
    limits = quota_limits_for(user_ids=owner_ids)
    held = gpus_held_by_owner(owner_ids=owner_ids)
    window = timedelta(hours=settings.FINETUNE_FAIRSHARE_WINDOW_HOURS)
    recent, week = gpu_seconds_by_owner(windows=[now - window, now - QUOTA_WEEK], until=now, owner_ids=owner_ids)
    return {
        owner: _Share(limits=limits.get(owner, Limits()), held=held.get(owner, 0),
                      recent_gpu_seconds=recent.get(owner, 0.0), week_gpu_seconds=week.get(owner, 0.0))
        for owner in owner_ids
    }


def _fair_order(runs: list[Run], shares: dict[int, _Share]) -> Iterator[Run]:
    """The runs in the order they are served: by lane, then larger priority; within one (lane,
    priority), the head run of the user ranking first by :meth:`_Share.rank`. Ranks are read when
    the generator resumes, so a booking the caller counted (``share.held``) moves its owner back."""
    groups: dict[tuple[int, int], dict[int, deque[Run]]] = {}
    for run in sorted(runs, key=lambda r: (r.lane, -r.priority, r.created_at, r.pk)):
        groups.setdefault((run.lane, -run.priority), {}).setdefault(run.owner_id, deque()).append(run)
    for key in sorted(groups):
        queues = groups[key]
        heap = [(shares[owner].rank(queue[0]), owner) for owner, queue in queues.items()]
        heapify(heap)
        while heap:
            _rank, owner = heappop(heap)
            queue = queues[owner]
            yield queue.popleft()
            if queue:
                heappush(heap, (shares[owner].rank(queue[0]), owner))


def _request(run: Run) -> Request:
    """What a waiting run asks for (an export always a CPU slot)."""
    return Request.from_task({"cpu": True} if run.lane == Lane.CPU else (run.gpu_config or {}), run.memory_estimate_gb)


def serving_order(runs: list[Run], *, hosts: list[HostState] | list[TimedHost]) -> list[Run]:
    """Waiting runs in the order a dispatch would serve them, for the queue page: the fair order of
    :func:`_fair_order`, counting each run's GPUs on ``hosts`` for its owner as if it started, unless
    a quota holds it back. (The dispatch itself also skips what does not fit now; the page's
    estimates account for that.) A fixed number of queries."""
    shares = _shares({run.owner_id for run in runs}, timezone.now())
    ordered: list[Run] = []
    for run in _fair_order(runs, shares):
        ordered.append(run)
        share = shares[run.owner_id]
        gpus = _request(run).gpu_count(hosts)
        if not share.quota_reason(gpus):
            share.held += gpus
    return ordered


def _write_wait_reasons(reasons: Collection[tuple[Run, str]]) -> None:
    """Write the reasons that changed (one bulk update) and tell each run's subject."""
    changed = [run for run, reason in reasons if run.wait_reason != reason]
    if not changed:
        return
    fresh = {run.pk: reason for run, reason in reasons}
    for run in changed:
        run.wait_reason = fresh[run.pk]
    Run.objects.bulk_update(changed, ["wait_reason"])
    for run in changed:
        workload_for(run.kind).waiting(run, run.wait_reason)


def _book(run: Run, placement: Placement, hosts: list[HostState], now: Any) -> bool:
    port = _free_master_port(placement.host) if run.lane == Lane.TRAIN else None
    try:
        with transaction.atomic():
            given = [g.name for h in hosts if h.name == placement.host for g in h.gpus if g.id in placement.gpu_ids]
            resources = booked_resources(given, 1 if placement.cpu_slot is not None else 0)
            moved = Run.objects.filter(
                pk=run.pk, status=RunStatus.PENDING, held=False, stop_requested_at__isnull=True
            ).update(status=RunStatus.QUEUED, queued_at=now, host=placement.host, master_port=port,
                     resources=resources, wait_reason="")
            if not moved:
                return False
            run.status, run.queued_at, run.host, run.master_port = RunStatus.QUEUED, now, placement.host, port
            run.resources, run.wait_reason = resources, ""
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

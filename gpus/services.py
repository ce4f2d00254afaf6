"""Everything that changes the inventory: announcing a host's GPUs, enabling and draining them."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from django.conf import settings
from django.db import models, transaction
from django.db.models.functions import Now
from django.utils import timezone

from gpus.inventory import Discovery
from gpus.models import RUN_HOLDING_STATUSES, Gpu, Host, Reservation, Run, RunStatus, stale_after
from gpus.scheduler import dispatch_on_commit, inventory_changed

logger = logging.getLogger(__name__)


class HostNameInUse(Exception):
    """Another live worker announces this host name (``FINETUNE_HOST`` is not unique)."""


def _boot_and_pid_namespace() -> str:
    """This kernel boot and pid namespace: two processes with the same value see the same pids, so
    a restart can tell that a pid recorded by its predecessor is gone. Empty where unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


@dataclass(frozen=True)
class WorkerIdentity:
    """Who announces a host: a random id per worker start, with its pid and machine for the message
    a second worker of the same name gets."""

    instance: str = field(default_factory=lambda: secrets.token_hex(8))
    pid: int = field(default_factory=os.getpid)
    machine: str = field(default_factory=socket.gethostname)
    boot: str = field(default_factory=_boot_and_pid_namespace)


def _in_use_message(name: str, holder: dict[str, Any]) -> str:
    seen, started = holder["silent_for"], holder["worker_for"]
    if seen is not None and (started is None or seen <= started):
        when = f"last seen {max(0, round(seen.total_seconds()))} s ago"
    elif started is not None:  # its agent has not reported yet
        when = f"started {max(0, round(started.total_seconds()))} s ago"
    else:
        when = "never seen"
    return (f"Host name {name!r} is already in use by a live worker (pid {holder['agent_pid'] or '?'} on "
            f"{holder['agent_machine'] or '?'}, {when}). Set FINETUNE_HOST to a unique name for this host, "
            "or stop the other worker.")


def _holder(**lookup: Any) -> dict[str, Any]:
    return Host.objects.with_worker_age().filter(**lookup).values(
        "agent_instance", "agent_pid", "agent_machine", "agent_boot", "silent_for", "worker_for"
    ).get()


def host_claim(*, name: str, me: WorkerIdentity) -> None:
    """Take the host name ``name`` for the worker ``me`` before it touches anything of that host.

    The name is free when no worker holds it (never announced, or cleanly stopped), when its holder
    is not live (neither it took the name nor its agent reported within ``FINETUNE_HOST_STALE_SECONDS``,
    by the database's clock), or when its holder ran on this machine and its pid is gone (a crash
    followed by an immediate restart). Otherwise raises :class:`HostNameInUse`: two workers with one
    name would fail each other's tasks. The claim is a conditional update stamped ``Now()``, so of two
    workers starting at once exactly one gets the name. It leaves ``last_seen_at`` alone: the host
    takes work once its agent has announced what it has. It records this worker's
    ``FINETUNE_HOST_ADDRESS``: where the gateway reaches the host's deployments.
    """
    claim = {"agent_instance": me.instance, "agent_pid": me.pid, "agent_machine": me.machine[:255],
             "agent_boot": me.boot[:128], "agent_started_at": Now(), "address": _address()}
    Host.objects.get_or_create(name=name)
    window = Now() - stale_after()
    silent = ((models.Q(last_seen_at__isnull=True) | models.Q(last_seen_at__lt=window))
              & (models.Q(agent_started_at__isnull=True) | models.Q(agent_started_at__lt=window)))
    free = models.Q(agent_instance="") | models.Q(agent_instance=me.instance) | silent
    if Host.objects.filter(free, name=name).update(**claim):
        return
    holder = _holder(name=name)
    pid = holder["agent_pid"]
    predecessor_gone = bool(me.boot) and holder["agent_boot"] == me.boot and (
        not pid or pid == me.pid or not psutil.pid_exists(pid)
    )
    # Conditional on the holder read above: a worker that claimed in between keeps the name.
    if predecessor_gone and Host.objects.filter(name=name, agent_instance=holder["agent_instance"]).update(**claim):
        logger.info("host %s: worker pid %s on this machine is gone; taking over its name", name, pid)
        return
    raise HostNameInUse(_in_use_message(name, holder))


def _address() -> str:
    """This host's address for the gateway (``FINETUNE_HOST_ADDRESS``, what swift deploy binds to)."""
    return settings.FINETUNE_HOST_ADDRESS.strip()[:255]


def host_release(*, name: str, instance: str) -> bool:
    """A cleanly stopping worker gives its host name back, so a restart is accepted at once."""
    return bool(Host.objects.filter(name=name, agent_instance=instance).update(
        agent_instance="", agent_pid=None, agent_boot="", agent_started_at=None
    ))


def default_cpu_slots(discovery: Discovery) -> int:
    """``FINETUNE_CPU_SLOTS`` if set; else 1 (on a GPU host it runs exports and tasks that ask for
    the CPU; a task asking for "any" device takes a GPU there)."""
    if settings.FINETUNE_CPU_SLOTS is not None:
        return settings.FINETUNE_CPU_SLOTS
    return 1


def host_announce(*, name: str, discovery: Discovery, cpu_slots: int, instance: str | None = None) -> bool:
    """Record what a host's agent discovered, stamped with the database's clock. Returns True when
    capacity appeared (the host was new or came back, or a GPU appeared), which is a reason to
    dispatch. ``instance``: the worker this agent belongs to (:func:`host_claim`); if another worker
    holds the name now, nothing is written and :class:`HostNameInUse` is raised. The host's address
    (``FINETUNE_HOST_ADDRESS``) is recorded with every announcement, so a changed one takes effect."""
    with transaction.atomic():
        host, created = Host.objects.with_silence().get_or_create(name=name)
        came_back = created or not host.is_live or host.cpu_slots < cpu_slots
        rows = Host.objects.filter(pk=host.pk)
        if instance is not None:
            rows = rows.filter(agent_instance=instance)
        if not rows.update(gpu_backend=discovery.backend, gpu_error=discovery.error, cpu_slots=cpu_slots,
                           address=_address(), last_seen_at=Now()):
            raise HostNameInUse(_in_use_message(name, _holder(pk=host.pk)))
        host.gpu_backend, host.gpu_error, host.cpu_slots = discovery.backend, discovery.error, cpu_slots
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
    """Enable a GPU, or disable (drain) it: a draining GPU takes no new run; its current run
    finishes. Enabling frees capacity, so the queue is dispatched."""
    Gpu.objects.filter(pk=gpu.pk).update(enabled=enabled)
    inventory_changed()
    gpu.refresh_from_db()
    if enabled:
        dispatch_on_commit()
    return gpu


# --- runs ---------------------------------------------------------------------------------------
def run_create(
    *, kind: str, subject_id: int, owner_id: int, label: str, lane: int, log_file_path: str, number: int = 1,
    priority: int = 5, held: bool = False, gpu_config: dict[str, Any] | None = None,
    memory_estimate_gb: float | None = None,
) -> Run:
    """Ask for a supervised process; the scheduler places it once the caller's transaction commits."""
    run = Run.objects.create(
        kind=kind, subject_id=subject_id, owner_id=owner_id, label=label[:255], lane=lane, number=number,
        priority=priority, held=held, gpu_config=gpu_config or {}, memory_estimate_gb=memory_estimate_gb,
        log_file_path=log_file_path,
    )
    dispatch_on_commit()
    return run


def run_stop(*, run: Run, reason: str = "") -> str:
    """Stop a run; idempotent. Returns ``"stopped"`` when it had not started (it is ``stopped`` now,
    its reservations released), ``"requested"`` when its supervisor was asked to stop the process,
    or ``""`` when it had ended already. Call inside the subject's own transaction."""
    now = timezone.now()
    with transaction.atomic():
        if Run.objects.filter(pk=run.pk, status__in=[RunStatus.PENDING, RunStatus.QUEUED]).update(
            status=RunStatus.STOPPED, stop_requested_at=now, finished_at=now, error=reason,
        ):
            Reservation.objects.filter(run_id=run.pk).delete()
            inventory_changed()
            run.refresh_from_db()
            dispatch_on_commit()
            return "stopped"
    if Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING, stop_requested_at__isnull=True).update(
        stop_requested_at=now
    ):
        run.stop_requested_at = now
        return "requested"
    return ""


def run_set_queue_fields(*, run_id: int | None, **fields: Any) -> bool:
    """Change a waiting run's ``priority`` or ``held`` (the scheduler reads them); dispatches."""
    if run_id is None or not Run.objects.filter(pk=run_id).update(**fields):
        return False
    dispatch_on_commit()
    return True


def runs_delete(*, kind: str, subject_ids: list[int]) -> int:
    """Delete the runs of deleted subjects (their reservations go with them). Returns how many."""
    if not subject_ids:
        return 0
    deleted, _ = Run.objects.filter(kind=kind, subject_id__in=subject_ids).delete()
    dispatch_on_commit()
    return deleted


def reservations_release(*, run_id: int) -> int:
    """Free everything a run holds. Returns how many reservations went; the caller dispatches
    (after commit) so the freed resources go to the queue."""
    deleted, _ = Reservation.objects.filter(run_id=run_id).delete()
    return deleted


def reservations_release_orphans() -> int:
    """Safety net for the sweep: delete reservations whose run has ended (a code path that forgot
    to release would otherwise block a GPU forever). A lost run keeps its own. Returns how many went."""
    deleted, _ = Reservation.objects.exclude(run__status__in=RUN_HOLDING_STATUSES).delete()
    if deleted:
        logger.warning("released %d reservation(s) whose run had ended", deleted)
        inventory_changed()
    return deleted

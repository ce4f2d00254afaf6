"""``manage.py worker``: this host's django-q2 cluster, with crash recovery before it starts.

Run one per host (``make worker``). It starts the GPU agent (inventory), reconciles tasks this
host left running (a crash or a restart of the previous worker), makes sure this host's periodic
sweep is scheduled, dispatches what fits, then runs ``qcluster`` on this host's own queue
(``settings.Q_CLUSTER["cluster_name"]``): the dispatcher enqueues a task on the queue of the host
that holds its GPUs.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django_q.cluster import Cluster
from django_q.conf import Conf
from django_q.models import Schedule

from gpus.inventory import discover
from gpus.process import stop_group, worker_shutdown_begin, worker_shutdown_prepare
from gpus.scheduler import dispatch
from gpus.services import HostNameInUse, WorkerIdentity, default_cpu_slots, host_claim, host_release
from gpus.supervisor import reconcile, reenqueue_queued

logger = logging.getLogger(__name__)

#: How long the cluster may take to stop in order (runners stop their swift groups within
#: SHUTDOWN_GRACE_SECONDS and record why) before whatever is left is killed.
_SHUTDOWN_SECONDS = 15.0


def _stop(agent: subprocess.Popen[bytes]) -> None:
    """Stop the GPU agent and wait for it, so it holds no database connection once we are gone."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.kill()


class _StopSignals:
    """SIGTERM and SIGINT, any number of them, only raise a flag that the main loop reads.

    django-q2's ``Cluster.sig_handler`` stops the cluster inside the handler; a second signal arriving
    while the first handler holds a multiprocessing lock re-enters it and deadlocks the worker for
    good (the process-group signal plus the one from a launcher are enough)."""

    def __init__(self) -> None:
        self.received = 0
        self.install()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.received += 1


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_leftovers(known: dict[int, psutil.Process]) -> list[int]:
    """Kill every process this worker started that is still alive: a swift group as a group (it leads
    a session of its own), anything else alone. ``is_running`` compares start times, so a recycled pid
    is never touched."""
    killed: list[int] = []
    for pid, proc in {**known, **_descendants()}.items():
        try:
            if not _alive(proc):
                continue
            if os.getsid(pid) == pid:
                stop_group(pid, grace=1.0)
            else:
                proc.kill()
            killed.append(pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return killed


def _claim_host_name() -> WorkerIdentity:
    """Hold ``FINETUNE_HOST`` for this worker, or refuse to start: a second live worker with the same
    name would reconcile away the first one's tasks and run its jobs with GPUs it does not have."""
    me = WorkerIdentity()
    try:
        host_claim(name=settings.FINETUNE_HOST, me=me)
    except HostNameInUse as exc:
        raise CommandError(str(exc)) from None
    return me


def _release_host_name(me: WorkerIdentity) -> None:
    try:
        # A fresh connection: the cluster's forked processes inherited this one's socket, and
        # PostgreSQL closed it when they ended.
        connections.close_all()
        host_release(name=settings.FINETUNE_HOST, instance=me.instance)
    except Exception:  # noqa: BLE001 - the name frees itself once the host is stale
        logger.warning("could not give back the host name %s", settings.FINETUNE_HOST, exc_info=True)


class Command(BaseCommand):
    help = "Run this host's task worker (django-q2 cluster) after recovering from a crash."

    def handle(self, *args: Any, **options: Any) -> None:
        me = _claim_host_name()  # first: before the reaping or the agent touch anything of this host
        stop = _StopSignals()
        # Reap before announcing: every process of a run this host's previous worker supervised (a crash,
        # or a silence that made the run lost) is stopped — pid *and* start time, never a recycled pid —
        # and its GPUs freed, so they cannot be booked while a leftover swift still holds them.
        ended = reconcile()
        if ended:
            self.stdout.write(f"Reaped {len(ended)} run(s) this host's previous worker left: {ended}")
        reenqueue_queued()  # a queued run whose job the broker lost starts all the same
        # The GPU agent runs as its own process (not a thread: django-q2 forks its workers).
        agent = subprocess.Popen([sys.executable, "manage.py", "gpu_agent", "--parent", str(os.getpid()),
                                  "--instance", me.instance], cwd=settings.BASE_DIR)
        atexit.register(_stop, agent)
        # One worker process per GPU and CPU slot (a running task holds one for its whole run),
        # plus room for the sweep and deployments, unless FINETUNE_WORKERS says otherwise.
        if not os.environ.get("FINETUNE_WORKERS"):
            discovery = discover()
            Conf.WORKERS = max(Conf.WORKERS or 2, len(discovery.gpus) + default_cpu_slots(discovery) + 2)
        queue = settings.Q_CLUSTER["cluster_name"]
        # A schedule without a cluster runs only on a cluster named like the prefix; every host
        # has its own queue, so each host gets its own sweep, bound to that queue.
        Schedule.objects.filter(name="finetune-sweep").delete()
        Schedule.objects.update_or_create(
            name=f"finetune-sweep:{settings.FINETUNE_HOST}"[:100],
            defaults={"func": "gpus.jobs.sweep", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1, "cluster": queue},
        )
        self.stdout.write(f"Worker for host {settings.FINETUNE_HOST}: queue {queue}, {Conf.WORKERS} processes")
        dispatch()
        settings.SECRET_KEY  # noqa: B018 - fail here, not in a forked process, if it is missing
        worker_shutdown_prepare()  # before the cluster forks: every worker process shares the flag
        cluster = Cluster()
        stop.install()  # after Cluster(), which installs its re-entrant handlers
        known: dict[int, psutil.Process] = {}
        try:
            if not stop.received:
                cluster.start()  # returns once the sentinel process runs the cluster
            beat = 0
            while not stop.received and cluster.sentinel is not None and cluster.sentinel.is_alive():
                cluster.sentinel.join(0.5)
                beat += 1
                if beat % 4 == 0:  # remembered: a process orphaned later (group signal) is still ours
                    known.update(_descendants())
        finally:
            try:
                self.shut_down(cluster, known, agent)
            finally:
                _release_host_name(me)  # a clean stop: a restart may take the name at once

    def shut_down(self, cluster: Cluster, known: dict[int, psutil.Process], agent: subprocess.Popen[bytes]) -> None:
        """Stop in order: runners stop their swift groups and record why, the cluster stops its
        processes, and whatever is left after ``_SHUTDOWN_SECONDS`` is killed."""
        self.stdout.write(f"Worker for host {settings.FINETUNE_HOST}: stopping")
        known.update(_descendants())
        worker_shutdown_begin()
        if cluster.stop_event is not None:
            # The sentinel stops its pusher, workers and monitor. From a thread: Event.set() waits for
            # the sentinel's acknowledgement, forever if the sentinel was killed while waiting on it.
            threading.Thread(target=cluster.stop_event.set, name="stop-cluster", daemon=True).start()
        sentinel = cluster.sentinel
        deadline = time.monotonic() + _SHUTDOWN_SECONDS
        # Wait for the sentinel and for every process it ever had: after a signal to the whole group
        # the sentinel is gone at once, while its orphaned runners still stop their swift groups.
        while time.monotonic() < deadline:
            known.update(_descendants())
            if sentinel is not None and sentinel.is_alive():
                sentinel.join(0.2)
            elif any(_alive(p) for pid, p in known.items() if pid != agent.pid):
                time.sleep(0.2)
            else:
                break
        _stop(agent)
        killed = _kill_leftovers(known)
        if killed:
            self.stdout.write(f"Killed {len(killed)} process(es) that did not stop in time: {killed}")
        self.stdout.write(f"Worker for host {settings.FINETUNE_HOST}: stopped")

"""The one supervisor: claim → launch → follow → stop → conclude, and the reconciler, for every run.

A django-q2 worker process calls :func:`run_job` with a queued run's id. The supervisor

1. **claims** it with one conditional update (``queued → running`` on this host, with a fresh
   ``runner_instance``): a second delivery of the same job is a no-op;
2. **launches** the workload's argv in a new session (its own process group), output appended to
   the run's log file, and records pid + start time;
3. **follows** the log file and hands complete lines to the workload, which writes what they mean
   (log lines, metrics, events); a heartbeat every ``FINETUNE_HEARTBEAT_SECONDS``;
4. **stops** the process group when the owner asks (SIGTERM, SIGKILL after the grace period), when the
   worker shuts down, or when the workload gives a reason (a readiness timeout);
5. **concludes**: the workload says what the exit means, and one transaction ends the run, releases
   *its own* reservations and gives the subject its final state.

**Fencing.** Every write is conditional on ``runner_instance`` and ``status='running'``. When one
matches nothing, the run was failed, stopped or found lost behind this supervisor's back (a stale
supervisor after a network partition, a reconciler that gave up on it): it stops its process group
and writes nothing more, so it can never overwrite a newer state or free another run's GPUs.

**Database outages** never stop a process: a failed write is retried with backoff
(:mod:`gpus.outage`), output stays buffered in the workload (bounded; the log file holds the rest),
and only a stop the owner asked for stops a run.

**The reconciler** (:func:`reconcile`, from every host's periodic sweep and at worker start) uses one
rule for every kind, with the database's clock: a running run on *this* host whose supervisor is gone
is failed and its leftover process group stopped (pid *and* start time, so a recycled pid is never
touched); a running run on a host silent for three times ``FINETUNE_LOST_AFTER_SECONDS`` becomes
``lost`` and keeps its reservations (its process may still hold the GPUs); a lost run of this host is
reaped when this host's worker is back. Staff release a dead host's lost runs in the admin.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections import deque
from pathlib import Path

import psutil
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from core.swift_cli.env import LaunchError
from core.swift_cli.output import LogSplitter
from gpus.models import Host, Reservation, Run, RunStatus
from gpus.outage import Backoff, database_failed, retry_database
from gpus.process import (
    DATABASE_PATIENCE_SECONDS,
    SHUTDOWN_GRACE_SECONDS,
    process_matches,
    run_as_popen_kwargs,
    runner_alive,
    signal_group,
    sigterm_means_shutdown,
    stop_group,
    stop_launched,
    worker_shutting_down,
)
from gpus.scheduler import dispatch_on_commit, enqueue_run, inventory_changed, run_requeue
from gpus.workloads import Fenced, Outcome, workload_for

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20


def claim(run_id: int) -> Run | None:
    """Take a queued run for this worker process; exactly one caller ever gets it, and only on the
    host that holds its reservations. The subject shows that it runs in the same transaction."""
    instance = uuid.uuid4().hex
    with transaction.atomic():
        claimed = Run.objects.filter(
            pk=run_id, status=RunStatus.QUEUED, stop_requested_at__isnull=True, host=settings.FINETUNE_HOST
        ).update(
            status=RunStatus.RUNNING, runner_instance=instance, runner_pid=os.getpid(),
            started_at=timezone.now(),  # this host's clock, like the process start time it is compared with
            heartbeat_at=Now(),  # the database's clock, like every liveness comparison
        )
        if not claimed:
            return None
        return Run.objects.get(pk=run_id)


class Supervisor:
    """The supervision of one claimed run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.instance = run.runner_instance
        self.workload = workload_for(run.kind)(run, self)
        self.db = Backoff()  # stop requests and heartbeats (the workload has its own for its writes)
        self.splitter = LogSplitter()
        self.tail: deque[str] = deque(maxlen=400)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.stop_signalled_at: float | None = None
        self.grace = settings.FINETUNE_STOP_GRACE_SECONDS
        self.shutdown = False
        self.stopped = False
        self.failure = ""
        self.killed = False
        self.fenced = False

    # --- fencing ----------------------------------------------------------------------------
    def owned(self) -> QuerySet[Run]:
        """The run's row, if and only if this supervisor still owns it."""
        return Run.objects.filter(pk=self.run.pk, runner_instance=self.instance, status=RunStatus.RUNNING)

    def write(self, **fields: object) -> None:
        """A fenced update of the run; raises :class:`Fenced` when it matched nothing."""
        if not self.owned().update(**fields):
            raise Fenced

    def lose(self, why: str) -> None:
        """The run is not ours any more: stop the process, write nothing more."""
        if self.fenced:
            return
        self.fenced = True
        logger.warning("run %s (%s %s): %s; stopping its process and writing nothing more",
                       self.run.pk, self.run.kind, self.run.subject_id, why)
        if self.proc is not None and self.stop_signalled_at is None:
            self.grace = min(self.grace, SHUTDOWN_GRACE_SECONDS)
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()

    # --- main -------------------------------------------------------------------------------
    def main(self) -> None:
        self.workload.claimed()
        try:
            launch = self.workload.prepare()
            as_user = run_as_popen_kwargs(argv=launch.argv, workdir=launch.workdir, env=launch.env)
        except (LaunchError, OSError) as exc:
            self.end(Outcome(RunStatus.FAILED, error=str(exc)))
            return
        log_path = Path(self.run.log_file_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = launch.shown or launch.argv
        try:
            self.log_offset = log_path.stat().st_size  # the file may hold earlier runs: read what this one adds
        except FileNotFoundError:
            self.log_offset = 0
        with log_path.open("ab") as log:
            for line in launch.header:
                log.write(f"{line}\n".encode())
            log.write(f"$ {shlex.join(shown)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(  # noqa: S603 - argv list from the allow-list, no shell
                    launch.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=launch.workdir, env=launch.env, start_new_session=True, close_fds=True, **as_user,
                )
            except OSError as exc:
                self.end(Outcome(RunStatus.FAILED, error=f"Could not start swift ({launch.argv[0]}): "
                                                         f"{exc.strerror or exc}"))
                return
        try:
            started: float | None = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            started = None
        pid = self.proc.pid
        try:
            retry_database(lambda: self.write(pid=pid, process_started=started, command=shown),
                           what=f"Recording the process of run {self.run.pk}", backoff=self.db)
        except Fenced:
            self.lose("it was ended before its process started")
        self.run.pid, self.run.process_started, self.run.command = pid, started, shown
        self.workload.launched(launch)
        self.supervise()

    def supervise(self) -> None:
        assert self.proc is not None
        poll = min(settings.FINETUNE_POLL_SECONDS, 0.1)
        heartbeat_every = settings.FINETUNE_HEARTBEAT_SECONDS
        last_heartbeat = last_check = time.monotonic()
        while True:
            self.read_output()
            if not self.fenced:
                self.workload.flush()
                if self.stop_signalled_at is None:
                    reason = self.workload.tick()
                    if reason:
                        self.stop(failure=reason)
            now = time.monotonic()
            if now - last_check >= min(0.5, heartbeat_every):
                last_check = now
                self.check_stop_request()
            if now - last_heartbeat >= heartbeat_every:
                last_heartbeat = now
                self.heartbeat()
            if self.stop_signalled_at is not None and not self.killed and now - self.stop_signalled_at >= self.grace:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.killed = True
            try:
                self.proc.wait(timeout=poll)  # returns the moment the wrapper exits
                break
            except subprocess.TimeoutExpired:
                pass
        # The wrapper is gone; nothing of its group may outlive it (dataloader workers, an orphaned
        # trainer or server), then read and write the last of the output.
        stop_group(self.proc.pid, grace=min(5.0, settings.FINETUNE_STOP_GRACE_SECONDS))
        if self.fenced:
            return
        self.drain()
        outcome = self.workload.conclude(self.proc.returncode, stopped=self.stopped, shutdown=self.shutdown,
                                         failure=self.failure, tail=list(self.tail))
        self.end(outcome)

    # --- output -----------------------------------------------------------------------------
    def read_output(self, *, final: bool = False) -> bool:
        """Hand what the process wrote since the last call to the workload, until its buffer is full
        (the database is away: the rest stays in the file). True when everything was read."""
        complete = True
        try:
            with Path(self.run.log_file_path).open("rb") as handle:
                handle.seek(self.log_offset)
                while not (full := self.workload.full) and (chunk := handle.read(_READ_CHUNK)):
                    self.log_offset += len(chunk)
                    self._lines(self.splitter.feed(chunk))
                complete = not full
        except FileNotFoundError:
            pass
        if final and complete:
            self._lines(self.splitter.flush())
        if self.workload.full:
            return False
        return self.workload.read_more() and complete

    def _lines(self, lines: list[str]) -> None:
        if lines:
            self.tail.extend(lines)
            self.workload.take_lines(lines)

    def drain(self) -> None:
        """After the process exited: read the rest of its output and write it, waiting for the
        database if it is away (up to ``DATABASE_PATIENCE_SECONDS``)."""
        give_up_at = time.monotonic() + DATABASE_PATIENCE_SECONDS
        while not self.fenced:
            read_all = self.read_output(final=True)
            if not self.workload.flush(force=True):
                if time.monotonic() >= give_up_at or worker_shutting_down():
                    raise DatabaseError(f"The database was away while run {self.run.pk} wrote its last output")
                time.sleep(0.5)  # the workload retries with its own backoff
            elif read_all:
                return

    # --- control ----------------------------------------------------------------------------
    def stop(self, *, failure: str = "", requested: bool = False) -> None:
        if self.proc is None or self.stop_signalled_at is not None:
            return
        self.failure = self.failure or failure
        self.stopped = self.stopped or requested
        self.workload.stop_note(failure or ("Stop requested" if requested else "Stopping"))
        signal_group(self.proc.pid, signal.SIGTERM)
        self.stop_signalled_at = time.monotonic()

    def check_stop_request(self) -> None:
        if self.stop_signalled_at is not None or self.proc is None:
            return
        if worker_shutting_down():
            self.shutdown = True
            self.grace = min(self.grace, SHUTDOWN_GRACE_SECONDS)
            self.stop()
            return
        if not self.db.ready():
            return
        try:
            row = Run.objects.filter(pk=self.run.pk).values("status", "runner_instance", "stop_requested_at").first()
        except DatabaseError as exc:  # no stop we know of: a run is never stopped for an outage
            database_failed(exc, what=f"Reading the stop request of run {self.run.pk}", backoff=self.db)
            return
        self.db.succeeded()
        if row is None or row["runner_instance"] != self.instance or row["status"] != RunStatus.RUNNING:
            self.lose("its run was ended or taken over behind its back")
        elif row["stop_requested_at"] is not None:
            self.stop(requested=True)

    def heartbeat(self) -> None:
        if self.fenced or not self.db.ready():
            return
        try:
            moved = self.owned().update(heartbeat_at=Now())
        except DatabaseError as exc:  # the process goes on; the next beat reconnects
            database_failed(exc, what=f"The heartbeat of run {self.run.pk}", backoff=self.db)
            return
        self.db.succeeded()
        if not moved:
            self.lose("its heartbeat matched no run of its own")

    # --- ending -----------------------------------------------------------------------------
    def end(self, outcome: Outcome) -> None:
        """End the run (fenced), release its own reservations and give the subject its final state, in
        one transaction; retried while the database is away."""
        if self.fenced:
            return

        def write() -> bool:
            # What the workload buffered goes first, outside the transaction: a write rolled back with
            # a failed ending would be gone from its buffer, and the retry would end without it.
            if not self.workload.flush(force=True) and not self.fenced:
                raise DatabaseError(f"the last output of run {self.run.pk} is not written yet")
            with transaction.atomic():
                fields: dict[str, object] = {"status": outcome.status, "exit_code": outcome.exit_code,
                                             "finished_at": timezone.now(), "heartbeat_at": Now()}
                if outcome.error:
                    fields["error"] = outcome.error
                if not self.owned().update(**fields):
                    return False
                Reservation.objects.filter(run_id=self.run.pk).delete()
                inventory_changed()
                self.run.status, self.run.exit_code, self.run.error = outcome.status, outcome.exit_code, outcome.error
                self.workload.ended(outcome)
            return True

        if not retry_database(write, what=f"Ending run {self.run.pk} ({outcome.status})", backoff=self.db):
            self.lose("it was ended behind its back before it could record its end")
            return
        dispatch_on_commit()
        self.workload.after(outcome)

    def kill(self) -> None:
        """Leave no process of the group alive (every exit path)."""
        stop_launched(self.proc)


def run_job(run_id: int) -> str:
    """Claim and supervise a run to its end (the django-q2 job of every kind). Returns a short
    outcome for django-q2's result record."""
    with sigterm_means_shutdown():
        return _run_job(run_id)


def _run_job(run_id: int) -> str:
    if worker_shutting_down():
        run = Run.objects.filter(pk=run_id, host=settings.FINETUNE_HOST).first()
        if run is not None and run_requeue(run=run, reason=f"The worker on host {run.host} shut down before it "
                                           "started this; back in the queue", dispatch_now=False):
            return f"run {run_id}: back in the queue (worker shutting down)"
        return f"run {run_id}: not claimed (worker shutting down)"
    run = claim(run_id)
    if run is None:
        return f"run {run_id}: not claimed (already taken, stopped or ended)"
    supervisor = Supervisor(run)
    try:
        supervisor.main()
    except BaseException as exc:
        logger.exception("supervisor of run %s crashed", run_id)
        supervisor.kill()
        if not supervisor.fenced:
            try:
                supervisor.end(Outcome(RunStatus.FAILED, error=f"The platform's supervisor failed: "
                                                               f"{type(exc).__name__}: {exc}"))
            except Exception:  # noqa: BLE001 - the reconciler records it once the database answers
                logger.exception("could not record the failure of run %s", run_id)
        if not isinstance(exc, Exception):
            raise
    finally:
        supervisor.kill()
    status = Run.objects.filter(pk=run_id).values_list("status", flat=True).first()
    return f"run {run_id} ({run.kind} {run.subject_id}): {status or 'deleted'}"


# --- reconciling ---------------------------------------------------------------------------------
def run_fail(*, run: Run, reason: str, statuses: tuple[str, ...] = (RunStatus.RUNNING,)) -> bool:
    """Fail a run no supervisor will end (conditional on its status and on the supervisor that held
    it, so a run claimed again meanwhile is left alone); its reservations go and its subject says
    why. Returns False if it had moved on."""
    with transaction.atomic():
        moved = Run.objects.filter(pk=run.pk, status__in=statuses, runner_instance=run.runner_instance).update(
            status=RunStatus.FAILED, finished_at=timezone.now(), error=reason,
        )
        if not moved:
            return False
        Reservation.objects.filter(run_id=run.pk).delete()
        inventory_changed()
        was_lost = run.status == RunStatus.LOST
        run.status, run.error = RunStatus.FAILED, reason
        if not was_lost:  # a lost run's subject was told when it was found lost
            workload_for(run.kind).failed_unsupervised(run, reason)
    dispatch_on_commit()
    return True


def run_mark_lost(*, run: Run, reason: str) -> bool:
    """A running run on a silent host: ``lost``, reservations kept; its subject fails with ``reason``."""
    with transaction.atomic():
        moved = Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING, runner_instance=run.runner_instance).update(
            status=RunStatus.LOST, error=reason,
        )
        if moved:
            run.status, run.error = RunStatus.LOST, reason
            workload_for(run.kind).failed_unsupervised(run, reason)
    return bool(moved)


def reconcile(*, host: str | None = None) -> list[int]:
    """One rule for every kind of run (see the module's docstring). Returns the ids of the runs it
    failed or found lost."""
    host = host or settings.FINETUNE_HOST
    stale_after = settings.FINETUNE_LOST_AFTER_SECONDS
    changed: list[int] = []
    # Silence by the database's clock, never this host's: heartbeats are stamped with it too.
    for run in Run.objects.filter(status__in=[RunStatus.RUNNING, RunStatus.LOST]).with_silence():
        silent_for = float("inf") if run.silent_for is None else run.silent_for.total_seconds()
        if run.host == host:
            patience = max(stale_after, DATABASE_PATIENCE_SECONDS)
            alive = runner_alive(run.runner_pid, run.started_at)
            if run.status == RunStatus.RUNNING and alive and silent_for < patience:
                continue  # its supervisor lives (through a database outage, too)
            if run.status == RunStatus.LOST and alive and process_matches(run.pid, run.process_started):
                continue  # its supervisor came back, found itself fenced and is stopping the process
            if process_matches(run.pid, run.process_started):
                stop_group(run.pid, grace=settings.FINETUNE_STOP_GRACE_SECONDS)
            if run.status == RunStatus.LOST:
                reason = f"{run.error}\nIts process was reaped when the worker on {host} came back."
            else:
                reason = workload_for(run.kind).supervisor_gone
            if run_fail(run=run, reason=reason, statuses=(run.status,)):
                changed.append(run.pk)
        elif run.status == RunStatus.RUNNING and silent_for > 3 * stale_after:
            reason = (f"Host {run.host or '?'} stopped reporting for {int(silent_for)} s (host down or its worker "
                      "stopped); the run is considered lost. Its GPUs stay booked until that host's worker comes "
                      "back and stops the process, or an operator releases them.")
            if run_mark_lost(run=run, reason=reason):
                changed.append(run.pk)
    return changed


def runs_release_lost(*, host: Host) -> int:
    """Staff know a silent host is gone for good: fail its lost runs and free what they held."""
    released = 0
    for run in Run.objects.filter(host=host.name, status=RunStatus.LOST):
        reason = f"{run.error}\nAn operator released its GPUs (host {host.name} is gone)."
        released += run_fail(run=run, reason=reason, statuses=(RunStatus.LOST,))
    return released


def reenqueue_queued(*, host: str | None = None) -> list[int]:
    """Hand this host's queued runs to its worker again (at worker start): a job lost from the broker
    (its queue emptied by hand, a restored database) must not leave a run queued forever. A run whose
    job was not lost just gets a second delivery, which finds nothing to claim."""
    host = host or settings.FINETUNE_HOST
    runs = list(Run.objects.filter(status=RunStatus.QUEUED, host=host))
    for run in runs:
        enqueue_run(run)
    return [run.pk for run in runs]


def requeue_stranded() -> list[int]:
    """Put queued runs whose host went silent before a supervisor claimed them back in the queue
    (reservations released), so they can start elsewhere. Returns their ids."""
    live = set(Host.objects.live().values_list("name", flat=True))
    return [
        run.pk
        for run in Run.objects.filter(status=RunStatus.QUEUED).exclude(host__in=live)
        if run_requeue(run=run, reason=f"Host {run.host} stopped reporting before it started this; back in the queue")
    ]

"""Runs one task's ``swift`` process inside a django-q2 worker and supervises it to the end.

Flow: :func:`claim` (atomic ``queued → running``; a second delivery of the same job is a no-op),
launch in a new session with output to the task's log file, follow the log and
``logging.jsonl`` through the :class:`~tasks.publisher.ProgressPublisher`, honour stop requests
(SIGTERM to the group, SIGKILL after the grace period), and write the terminal state with a
conditional update. Whatever happens, the ``finally`` leaves no process of the group alive.

A resumed run (``task.resume_from`` set by :func:`tasks.services.finetuning_task_resume`) passes
``--resume_from_checkpoint``; swift then writes into a new versioned folder ``output/v<N>-…``
whose ``logging.jsonl`` starts at step N+1. The runner finds that folder (swift's
``output_dir: …`` line, else the ``v*-*`` folder that appeared after the launch) and follows its
``logging.jsonl``; it reads ``train.log`` from where the earlier runs ended, so log sequence numbers
and metric steps continue without repeats.

A database outage never stops swift: the publisher buffers what the run reports and writes it when
the database is back (see :mod:`tasks.publisher`), stop requests are read again once it answers,
and the final state is written with retries. Only a stop the owner asked for stops a run.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

import psutil
from django.conf import settings
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from tasks.builtin_models import BuiltinModelError, builtin_model_path, is_built, is_builtin_model_id
from tasks.command import LaunchError, build_argv, build_env
from tasks.exports import reconcile_exports
from tasks.models import EventKind, FinetuningTask, TaskStatus
from tasks.paths import is_within
from tasks.process import (
    DATABASE_PATIENCE_SECONDS,
    SHUTDOWN_GRACE_SECONDS,
    signal_group,
    sigterm_means_shutdown,
    stop_group,
    stop_launched,
    supervision_lost,
    worker_shutting_down,
)
from tasks.publisher import Backoff, ProgressPublisher, retry_database, stop_requested
from tasks.scheduler import task_requeue
from tasks.selectors import run_folders
from tasks.swift_failures import explain_failure
from tasks.swift_output import JsonlTail, LogSplitter, checkpoint_saved, interpret_logging_record

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
#: swift's line naming the versioned folder it created (``SftArguments._add_version``).
_OUTPUT_DIR_LINE = re.compile(r"\[INFO:swift\] output_dir: (?P<path>\S.*?)\s*$")


class DatabaseAway(RuntimeError):
    """The database did not come back within ``DATABASE_PATIENCE_SECONDS`` after swift exited (the
    reconciler then fails the task as lost)."""


def claim(task_id: int) -> bool:
    """Atomically take a queued task for this worker. Exactly one caller ever gets True, and only
    on the host that holds the task's reservations (a stale job on another host is a no-op)."""
    now = timezone.now()
    claimed = FinetuningTask.objects.filter(
        pk=task_id, status=TaskStatus.QUEUED, stop_requested_at__isnull=True, host=settings.FINETUNE_HOST
    ).update(
        status=TaskStatus.RUNNING,
        started_at=now,  # this host's clock, like the runner's start time it is compared with
        heartbeat_at=Now(),  # the database's clock, like every liveness comparison
        runner_pid=os.getpid(),
    )
    return claimed == 1


class TaskRun:
    """The supervision of one claimed task."""

    def __init__(self, task: FinetuningTask) -> None:
        self.task = task
        self.publisher = ProgressPublisher(task)
        self.reads = Backoff()  # stop requests (reads may work while writes fail: SQLite locked)
        self.splitter = LogSplitter()
        self.tail_lines: deque[str] = deque(maxlen=400)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.stop_signalled_at: float | None = None
        self.grace = settings.FINETUNE_STOP_GRACE_SECONDS
        self.shutdown = False
        self.killed = False
        self.jsonl: JsonlTail | None = None
        self.run_dir: Path | None = None
        self.resume_from: Path | None = Path(task.resume_from) if task.resume_from else None
        self.folders_before: set[str] = set()

    # --- main -------------------------------------------------------------------------------
    def run(self) -> None:
        task = self.task
        output_dir = Path(task.output_path)
        if self.resume_from is not None:
            self.publisher.event(
                EventKind.STARTED, f"Started on {task.host}: run {task.run_number}, resuming from "
                f"{self.resume_from.name}", host=task.host, run=task.run_number, checkpoint=str(self.resume_from),
            )
        else:
            self.publisher.event(EventKind.STARTED, f"Started on {task.host}", host=task.host)
        log_path = Path(task.log_file_path)
        workdir = log_path.parent
        if _builtin_model_missing(task.base_model):
            self.publisher.add_lines([f"[platform] Building the built-in model {task.base_model} on its first use "
                                      "(a few seconds)"])
            self.publisher.flush(force=True)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            output_dir.mkdir(parents=True, exist_ok=True)
            argv = build_argv(task, output_dir=output_dir, resume_from=self.resume_from)  # builds it
            launch = build_env(task, workdir=workdir)
        except LaunchError as exc:
            self.finish(TaskStatus.FAILED, error=str(exc))
            return
        if self.resume_from is None:
            self.follow_run_dir(output_dir)
        else:
            # swift names the new folder at start-up; remember what existed so it can be told apart.
            self.folders_before = {p.name for p in run_folders(output_dir)}
        try:
            # The log file holds the earlier runs too: read only what this run appends.
            self.log_offset = log_path.stat().st_size
        except FileNotFoundError:
            self.log_offset = 0
        with log_path.open("ab") as log:
            if self.resume_from is not None:
                log.write(f"--- run {task.run_number}: resuming from {self.resume_from} ---\n".encode())
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(  # noqa: S603 - argv list from the allow-list, no shell
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=workdir, env=launch.env, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                self.finish(TaskStatus.FAILED, error=f"Could not start swift ({argv[0]}): {exc.strerror or exc}")
                return
        try:
            started = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            started = None
        self.publisher.set(pid=self.proc.pid, process_started=started, command=argv)
        self.publisher.flush(force=True)
        self.supervise()

    def supervise(self) -> None:
        assert self.proc is not None
        poll = settings.FINETUNE_POLL_SECONDS
        heartbeat_every = settings.FINETUNE_HEARTBEAT_SECONDS
        last_heartbeat = last_check = time.monotonic()
        while True:
            self.read_output()
            self.publisher.flush()
            now = time.monotonic()
            if now - last_check >= min(0.5, heartbeat_every):
                last_check = now
                self.check_stop_request()
            if now - last_heartbeat >= heartbeat_every:
                last_heartbeat = now
                self.heartbeat()
            if self.stop_signalled_at is not None and not self.killed:
                if now - self.stop_signalled_at >= self.grace:
                    signal_group(self.proc.pid, signal.SIGKILL)
                    self.killed = True
            try:
                self.proc.wait(timeout=poll)  # returns the moment swift exits
                break
            except subprocess.TimeoutExpired:
                pass
        # The wrapper is gone; make sure nothing of its group outlives it (dataloader workers,
        # an orphaned trainer), then read and write the last of the output.
        stop_group(self.proc.pid, grace=min(5.0, settings.FINETUNE_STOP_GRACE_SECONDS))
        self.drain()
        self.conclude(self.proc.returncode)

    # --- output -----------------------------------------------------------------------------
    def read_output(self, *, final: bool = False) -> bool:
        """Hand what swift wrote since the last call to the publisher, until its buffer is full (the
        database is away): the rest stays in the files and is read once the buffer drains. Returns
        True when everything written so far was read."""
        complete = True
        log_path = Path(self.task.log_file_path)
        try:
            with log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                while not (full := self.publisher.full) and (chunk := handle.read(_READ_CHUNK)):
                    self.log_offset += len(chunk)
                    self._lines(self.splitter.feed(chunk))
                complete = not full
        except FileNotFoundError:
            pass
        if final and complete:
            self._lines(self.splitter.flush())
        if self.jsonl is None and self.resume_from is not None:
            self.find_run_dir()
        if self.jsonl is not None:
            if self.publisher.full:
                return False
            for record in self.jsonl.read(max_bytes=_READ_CHUNK):
                meaning = interpret_logging_record(record)
                if meaning.point is not None:
                    self.publisher.add_metric(meaning.point)
                if meaning.summary is not None:
                    self.publisher.add_summary(meaning.summary, meaning.nonfinite)
                if meaning.last_checkpoint:
                    self.publisher.set(last_checkpoint=meaning.last_checkpoint)
            complete = complete and self.jsonl.caught_up
        return complete

    def drain(self) -> None:
        """After swift exited: read the rest of its output and write it, waiting for the database if
        it is away."""
        give_up_at = time.monotonic() + DATABASE_PATIENCE_SECONDS
        while True:
            read_all = self.read_output(final=True)
            if not self.publisher.flush(force=True):
                self._wait_for_database(give_up_at, "writing the last output")
            elif read_all:
                return

    def follow_run_dir(self, folder: Path) -> None:
        """Follow ``folder/logging.jsonl`` from now on (the folder this run writes into)."""
        self.run_dir = folder
        self.jsonl = JsonlTail(folder / "logging.jsonl")
        self.publisher.set(run_dir=str(folder))

    def find_run_dir(self, named: str | None = None) -> None:
        """The versioned folder of a resumed run: the one swift named in its log if it is a new
        folder directly under the output folder, else the newest ``v*-*`` folder that was not there
        before the launch."""
        output_dir = Path(self.task.output_path)
        if named is not None:
            candidate = Path(named)
            if candidate.parent == output_dir and is_within(candidate, output_dir) and (
                candidate.name not in self.folders_before
            ):
                self.follow_run_dir(candidate)
            return
        fresh = [p for p in run_folders(output_dir) if p.name not in self.folders_before]
        if fresh:
            self.follow_run_dir(fresh[-1])

    def _lines(self, lines: list[str]) -> None:
        if not lines:
            return
        self.tail_lines.extend(lines)
        self.publisher.add_lines(lines)
        for line in lines:
            if self.jsonl is None and self.resume_from is not None:
                named = _OUTPUT_DIR_LINE.search(line)
                if named:
                    self.find_run_dir(named.group("path"))
            path = checkpoint_saved(line)
            if path:
                self.publisher.set(last_checkpoint=path)
                self.publisher.event(EventKind.CHECKPOINT, f"Checkpoint saved: {Path(path).name}", path=path)

    # --- control ----------------------------------------------------------------------------
    def check_stop_request(self) -> None:
        if self.stop_signalled_at is not None or self.proc is None:
            return
        if worker_shutting_down():
            self.shutdown = True
            self.grace = min(self.grace, SHUTDOWN_GRACE_SECONDS)
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()
            return
        if stop_requested(FinetuningTask, self.task.pk, backoff=self.reads,
                          what=f"Reading the stop request of task {self.task.pk}"):
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()

    def heartbeat(self) -> None:
        self.publisher.heartbeat()  # buffered like the rest while the database is away

    # --- ending -----------------------------------------------------------------------------
    def conclude(self, returncode: int | None) -> None:
        if self.shutdown and returncode != 0:
            self.finish(TaskStatus.FAILED, exit_code=returncode, error=(
                f"The worker on host {self.task.host} was shut down (Ctrl-C or SIGTERM) while this task ran; "
                "its swift process was stopped. Resume from the last checkpoint or start the task again."))
        elif self.stop_signalled_at is not None and returncode != 0:
            self.finish(TaskStatus.STOPPED, exit_code=returncode)
        elif returncode == 0:
            self.finish(TaskStatus.COMPLETED, exit_code=0)
        else:
            reason = explain_failure(list(self.tail_lines), returncode, offline=settings.FINETUNE_OFFLINE)
            self.finish(TaskStatus.FAILED, exit_code=returncode, error=reason)

    def finish(self, status: str, *, exit_code: int | None = None, error: str = "") -> None:
        from tasks.services import finetuning_task_finish

        if status == TaskStatus.COMPLETED:
            self.publisher.set(progress=100.0, eta_seconds=0.0)
            latest = _latest_checkpoint(self.run_dir or Path(self.task.output_path))
            if latest and _step_of(latest) >= _step_of(self.task.last_checkpoint):
                self.publisher.set(last_checkpoint=latest)
        give_up_at = time.monotonic() + DATABASE_PATIENCE_SECONDS
        while not self.publisher.flush(force=True):
            self._wait_for_database(give_up_at, f"recording that it ended {status}")
        retry_database(
            lambda: finetuning_task_finish(task=self.task, status=status, exit_code=exit_code, error=error),
            what=f"Finishing task {self.task.pk} ({status})", backoff=self.publisher.backoff,
        )

    def _wait_for_database(self, give_up_at: float, doing: str) -> None:
        """Sleep until the next try; give up after ``DATABASE_PATIENCE_SECONDS``, or at once when the
        worker is shutting down (the reconciler then fails the task as lost)."""
        if time.monotonic() >= give_up_at or worker_shutting_down():
            raise DatabaseAway(f"The database was away while task {self.task.pk} was {doing}; giving up")
        self.publisher.backoff.wait()

    def kill(self) -> None:
        """Leave no process of the group alive (used on every exit path)."""
        stop_launched(self.proc)


def _builtin_model_missing(base_model: str) -> bool:
    if not is_builtin_model_id(base_model):
        return False
    try:
        return not is_built(builtin_model_path(base_model))
    except BuiltinModelError:
        return False  # build_argv says why it cannot run


def _step_of(path: str) -> int:
    suffix = Path(path).name.removeprefix("checkpoint-") if path else ""
    return int(suffix) if suffix.isdigit() else -1


def _latest_checkpoint(output_dir: Path) -> str:
    best: tuple[int, str] | None = None
    for child in output_dir.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if child.is_dir() and suffix.isdigit() and (best is None or int(suffix) > best[0]):
            best = (int(suffix), str(child))
    return best[1] if best else ""


def run_task(task_id: int) -> str:
    """Claim and run a task to its end. Returns a short outcome for django-q2's result record."""
    with sigterm_means_shutdown():
        return _run_task(task_id)


def _run_task(task_id: int) -> str:
    if worker_shutting_down():
        task = FinetuningTask.objects.filter(pk=task_id, host=settings.FINETUNE_HOST).first()
        if task is not None and task_requeue(task=task, reason=f"The worker on host {task.host} shut down before "
                                             "it started the task; back in the queue"):
            return f"task {task_id}: back in the queue (worker shutting down)"
        return f"task {task_id}: not claimed (worker shutting down)"
    if not claim(task_id):
        return f"task {task_id}: not claimed (already taken, stopped or deleted)"
    task = FinetuningTask.objects.get(pk=task_id)
    run = TaskRun(task)
    try:
        run.run()
    except BaseException as exc:
        logger.exception("runner for task %s crashed", task_id)
        run.kill()
        from tasks.services import finetuning_task_finish

        finetuning_task_finish(
            task=task, status=TaskStatus.FAILED, exit_code=None,
            error=f"The platform's runner failed: {type(exc).__name__}: {exc}",
        )
        if not isinstance(exc, Exception):
            raise
    finally:
        run.kill()
    status = FinetuningTask.objects.filter(pk=task_id).values_list("status", flat=True).first()
    return f"task {task_id}: {status or 'deleted'}"


def reconcile_host(*, host: str | None = None) -> list[int]:
    """Fail running tasks whose supervision is gone, so nothing stays ``running`` forever (exports
    too: :func:`tasks.exports.reconcile_exports`).

    On this host a task is lost when its runner (the worker process) is gone (a runner that is alive
    keeps its run through a database outage: :func:`tasks.process.supervision_lost`); a swift group it
    left behind (same pid *and* start time, so a recycled pid is never touched) is stopped. A task on
    another host is lost when that host has not sent a heartbeat for three times
    ``FINETUNE_LOST_AFTER_SECONDS``, by the database's clock. Returns the ids marked failed.
    """
    from tasks.services import finetuning_task_finish

    host = host or settings.FINETUNE_HOST
    failed: list[int] = []
    # Silence by the database's clock, never this host's: heartbeats are stamped with it too.
    for task in FinetuningTask.objects.filter(status=TaskStatus.RUNNING).annotate(silent_for=Now() - F("heartbeat_at")):
        lost = supervision_lost(
            holder_host=task.host, runner_pid=task.runner_pid, claimed_at=task.started_at, pid=task.pid,
            process_started=task.process_started,
            silent_for=float("inf") if task.silent_for is None else task.silent_for.total_seconds(),
            this_host=host, stale_after=settings.FINETUNE_LOST_AFTER_SECONDS,
        )
        if lost is None:
            continue
        here, silent_for = lost
        if here:
            reason = ("The worker supervising this task stopped (worker crash or restart); its swift "
                      "process was stopped. Resume from the last checkpoint or start the task again.")
        else:
            reason = (f"Host {task.host or '?'} stopped reporting for {int(silent_for)} s (host down or its "
                      "worker stopped); the task is considered lost.")
        if finetuning_task_finish(task=task, status=TaskStatus.FAILED, exit_code=None, error=reason):
            failed.append(task.pk)
    try:
        reconcile_exports(host=host)
    except Exception:  # noqa: BLE001 - exports must never stop the reconciliation of training tasks
        logger.exception("reconciling exports failed")
    return failed

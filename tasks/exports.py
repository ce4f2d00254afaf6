"""Runs one ``swift export --merge_lora`` inside a django-q2 worker and supervises it to the end.

The same shape as :mod:`tasks.runner`: an atomic claim (``pending → running``; a second delivery of
the job is a no-op), a launch in a new session with output to the export's log file, a loop that
keeps the stored log text current and honours stop requests (SIGTERM to the group, SIGKILL after
the grace period), and the terminal state through :func:`tasks.services.task_export_finish`. A
failed export's partial folder is removed, so a ``<checkpoint>-merged`` folder on disk is always a
complete merge. Exports run on the CPU (``CUDA_VISIBLE_DEVICES=""``) and reserve no GPU.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from django.conf import settings
from django.db import DatabaseError
from django.http import StreamingHttpResponse
from django.utils import timezone

from finetune_platform.streaming import streamed_download
from tasks.command import LaunchError, build_export_argv, build_export_env
from tasks.models import ExportStatus, TaskExport
from tasks.paths import folder_size, is_within
from tasks.process import (
    SHUTDOWN_GRACE_SECONDS,
    process_matches,
    runner_alive,
    signal_group,
    sigterm_means_shutdown,
    stop_group,
    stop_launched,
    worker_shutting_down,
)
from tasks.publisher import Backoff, database_failed, retry_database, stop_requested
from tasks.swift_failures import explain_failure
from tasks.swift_output import LogSplitter

logger = logging.getLogger(__name__)

#: The stored log keeps the last lines (the whole file stays on disk next to it).
LOG_TAIL_LINES = 2000
LOG_TAIL_CHARS = 256 * 1024
_SAVE_EVERY = 1.0


def claim_export(export_id: int) -> bool:
    """Atomically take a pending export for this worker; exactly one caller ever gets True."""
    now = timezone.now()
    return TaskExport.objects.filter(pk=export_id, status=ExportStatus.PENDING, stop_requested_at__isnull=True).update(
        status=ExportStatus.RUNNING, started_at=now, host=settings.FINETUNE_HOST, runner_pid=os.getpid(),
    ) == 1


def remove_partial_output(export: TaskExport) -> None:
    """Remove a merged folder that is not the result of a completed export (a failed or interrupted
    merge, or a leftover), only ever inside the task's own output folder."""
    target = Path(export.output_path)
    output = Path(export.task.output_path)
    if not export.output_path or not target.name.endswith("-merged") or not is_within(target, output):
        return
    owned = TaskExport.objects.filter(output_path=export.output_path, status=ExportStatus.COMPLETED).exclude(
        pk=export.pk
    )
    if owned.exists() or not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
    else:
        shutil.rmtree(target, ignore_errors=True)


class ExportRun:
    """The supervision of one claimed export."""

    def __init__(self, export: TaskExport) -> None:
        self.export = export
        self.splitter = LogSplitter()
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.stop_signalled_at: float | None = None
        self.grace = settings.FINETUNE_STOP_GRACE_SECONDS
        self.shutdown = False
        self.killed = False
        self._saved_lines = -1
        self._received = 0
        self.db = Backoff()  # a database outage delays the stored log and stop checks, never the merge

    def run(self) -> None:
        from tasks.services import task_export_finish

        export = self.export
        task = export.task
        checkpoint, target = Path(export.checkpoint), Path(export.output_path)
        output = Path(task.output_path)
        log_path = Path(export.log_file_path)
        workdir = log_path.parent
        try:
            if not is_within(checkpoint, output) or not is_within(target, output):
                raise LaunchError("The checkpoint and the merged folder must be inside the task's output folder.")
            workdir.mkdir(parents=True, exist_ok=True)
            remove_partial_output(export)  # a leftover of an earlier, interrupted merge
            if target.exists():
                raise LaunchError(f"{target} exists already and belongs to a completed export.")
            argv = build_export_argv(checkpoint=checkpoint, output_dir=target)
            launch = build_export_env(workdir=workdir)
        except LaunchError as exc:
            task_export_finish(export=export, status=ExportStatus.FAILED, exit_code=None, error=str(exc))
            return
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(  # noqa: S603 - argv list built by the platform, no shell
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=workdir, env=launch.env, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                task_export_finish(export=export, status=ExportStatus.FAILED, exit_code=None,
                                   error=f"Could not start swift ({argv[0]}): {exc.strerror or exc}")
                return
        try:
            started = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            started = None
        pid = self.proc.pid
        retry_database(lambda: TaskExport.objects.filter(pk=export.pk).update(
            pid=pid, process_started=started, command=argv,
        ), what=f"Recording the process of export {export.pk}", backoff=self.db)
        self.supervise()

    def supervise(self) -> None:
        assert self.proc is not None
        last_save = last_check = time.monotonic()
        while True:
            self.read_output()
            now = time.monotonic()
            if now - last_check >= 0.5:
                last_check = now
                self.check_stop_request()
            if now - last_save >= _SAVE_EVERY:
                last_save = now
                self.save_log()
            if self.stop_signalled_at is not None and not self.killed:
                if now - self.stop_signalled_at >= self.grace:
                    signal_group(self.proc.pid, signal.SIGKILL)
                    self.killed = True
            try:
                self.proc.wait(timeout=settings.FINETUNE_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
        stop_group(self.proc.pid, grace=min(5.0, settings.FINETUNE_STOP_GRACE_SECONDS))
        self.read_output(final=True)
        self.save_log()
        self.conclude(self.proc.returncode)

    def read_output(self, *, final: bool = False) -> None:
        try:
            with Path(self.export.log_file_path).open("rb") as handle:
                handle.seek(self.log_offset)
                while chunk := handle.read(1 << 20):
                    self.log_offset += len(chunk)
                    self._take(self.splitter.feed(chunk))
        except FileNotFoundError:
            pass
        if final:
            self._take(self.splitter.flush())

    def _take(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        self._received += len(lines)

    def log_text(self) -> str:
        text = "\n".join(self.lines)
        return text[-LOG_TAIL_CHARS:]

    def save_log(self) -> None:
        if self._received == self._saved_lines or not self.db.ready():
            return
        try:
            TaskExport.objects.filter(pk=self.export.pk).update(log_text=self.log_text())
        except DatabaseError as exc:  # a database hiccup must not kill the merge; saved at the next try
            database_failed(exc, what=f"Saving the log of export {self.export.pk}", backoff=self.db)
            return
        self.db.succeeded()
        self._saved_lines = self._received

    def check_stop_request(self) -> None:
        if self.stop_signalled_at is not None or self.proc is None:
            return
        if worker_shutting_down():
            self.shutdown = True
            self.grace = min(self.grace, SHUTDOWN_GRACE_SECONDS)
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()
            return
        if stop_requested(TaskExport, self.export.pk, backoff=self.db,
                          what=f"Reading the stop request of export {self.export.pk}"):
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()

    def conclude(self, returncode: int | None) -> None:
        """Record the ending, retried while the database is away (the merged folder stays on disk)."""
        retry_database(lambda: self._conclude(returncode), what=f"Finishing export {self.export.pk}",
                       backoff=self.db)

    def _conclude(self, returncode: int | None) -> None:
        from tasks.services import task_export_finish

        if self._received != self._saved_lines:  # the last save was skipped (the database was away)
            TaskExport.objects.filter(pk=self.export.pk).update(log_text=self.log_text())
            self._saved_lines = self._received

        export = self.export
        target = Path(export.output_path)
        if returncode == 0 and self.stop_signalled_at is None and (target / "config.json").is_file():
            task_export_finish(export=export, status=ExportStatus.COMPLETED, exit_code=0,
                               size_bytes=folder_size(target))
            return
        if self.shutdown:
            error = (f"The worker on host {export.host or settings.FINETUNE_HOST} was shut down (Ctrl-C or SIGTERM) "
                     "during the export; the partial merged folder was removed. Export again.")
        elif self.stop_signalled_at is not None:
            error = "Stopped on request; the partial merged folder was removed."
        elif returncode == 0:
            error = f"swift export exited without writing {target.name}/config.json."
        else:
            error = explain_failure(list(self.lines), returncode, offline=settings.FINETUNE_OFFLINE)
            error = error.replace("The training process", "The export process")
        remove_partial_output(export)
        task_export_finish(export=export, status=ExportStatus.FAILED, exit_code=returncode, error=error)

    def kill(self) -> None:
        """Leave no process of the group alive (used on every exit path)."""
        stop_launched(self.proc)


def run_export(export_id: int) -> str:
    """Claim and run an export to its end. Returns a short outcome for django-q2's result record."""
    with sigterm_means_shutdown():
        return _run_export(export_id)


def _run_export(export_id: int) -> str:
    from tasks.services import task_export_finish

    if not claim_export(export_id):
        return f"export {export_id}: not claimed (already taken, stopped or deleted)"
    export = TaskExport.objects.select_related("task").get(pk=export_id)
    run = ExportRun(export)
    try:
        run.run()
    except BaseException as exc:
        logger.exception("runner for export %s crashed", export_id)
        run.kill()
        remove_partial_output(export)
        task_export_finish(export=export, status=ExportStatus.FAILED, exit_code=None,
                           error=f"The platform's export runner failed: {type(exc).__name__}: {exc}")
        if not isinstance(exc, Exception):
            raise
    finally:
        run.kill()
    status = TaskExport.objects.filter(pk=export_id).values_list("status", flat=True).first()
    return f"export {export_id}: {status or 'deleted'}"


def reconcile_exports(*, host: str | None = None) -> list[int]:
    """Fail exports whose supervision is gone, so none stays ``running`` (or ``pending``) forever.

    On this host a running export is lost when its worker process is gone; a swift group it left
    behind (same pid and start time) is stopped and the partial folder removed. An export of
    another host is lost when that host has been silent for three times
    ``FINETUNE_LOST_AFTER_SECONDS``, running or still waiting for it. Returns the ids failed.
    """
    from gpus.models import Host
    from tasks.services import task_export_finish

    host = host or settings.FINETUNE_HOST
    stale_after = 3 * settings.FINETUNE_LOST_AFTER_SECONDS
    # How long each host has been silent, by the database's clock (its agent stamps it with Now()).
    seen = dict(Host.objects.with_silence().values_list("name", "silent_for"))
    failed: list[int] = []
    for export in TaskExport.objects.filter(status__in=[ExportStatus.PENDING, ExportStatus.RUNNING]).select_related(
        "task"
    ):
        if export.status == ExportStatus.RUNNING and export.host == host:
            if runner_alive(export.runner_pid, export.started_at):
                continue
            if process_matches(export.pid, export.process_started):
                stop_group(export.pid, grace=settings.FINETUNE_STOP_GRACE_SECONDS)
            remove_partial_output(export)
            reason = "The worker running this export stopped (worker crash or restart); export the checkpoint again."
        else:
            silence = seen.get(export.host)
            silent_for = silence.total_seconds() if silence is not None else float("inf")
            if export.host == host or silent_for <= stale_after:
                continue
            reason = (f"Host {export.host or '?'} stopped reporting for {int(silent_for)} s before the export "
                      "finished; export the checkpoint again.")
        if task_export_finish(export=export, status=ExportStatus.FAILED, exit_code=None, error=reason):
            failed.append(export.pk)
    return failed


# --- download ---------------------------------------------------------------------------------------
class _Pipe:
    """A write-only sink for :class:`zipfile.ZipFile` that hands out what was written so far."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        if data:
            self.chunks.append(bytes(data))
            self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def zip_chunks(folder: Path, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A zip of ``folder`` produced piece by piece (constant memory, any size: ZIP64 where needed).

    Weights do not compress, so files are stored; symlinks are skipped (nothing outside the folder
    is ever read)."""
    pipe = _Pipe()
    root = folder.name
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                arcname = f"{root}/{path.relative_to(folder).as_posix()}"
                info = zipfile.ZipInfo.from_file(path, arcname)
                info.compress_type = zipfile.ZIP_STORED
                big = info.file_size > 0x7FFF0000
                with path.open("rb") as source, archive.open(info, "w", force_zip64=big) as target:
                    while block := source.read(chunk_size):
                        target.write(block)
                        if pipe.written:
                            yield pipe.take()
                yield pipe.take()
    yield pipe.take()


def zip_stream_response(request: Any, folder: Path, *, filename: str) -> StreamingHttpResponse:
    """A streamed zip download of ``folder`` (never held in memory)."""
    return streamed_download(request, (c for c in zip_chunks(folder) if c), content_type="application/zip",
                             filename=filename)

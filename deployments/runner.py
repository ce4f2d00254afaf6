"""Runs one deployment's ``swift deploy`` inside a django-q2 worker and supervises it to the end.

Flow: :func:`claim` (atomic ``pending → starting`` on the host that holds the reservation; a second
delivery is a no-op), allocate a port (:mod:`deployments.ports`), launch swift in a new session
bound to 127.0.0.1 with a random API key, follow its log until the Uvicorn line names the port it
really bound (swift silently moves on when the port is busy), check that port is held by our own
process group and that ``/v1/models`` answers, then ``starting → running``. While it runs: honour
stop requests and the idle timeout, heartbeat, and notice the process dying. Every ending goes
through :func:`deployments.services.deployment_finish` (GPUs, CPU slot and port released), and the
``finally`` leaves no process of the group alive.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from deployments.command import HOST, build_argv, build_env, redact
from deployments.logs import DeploymentLog
from deployments.models import Deployment, DeploymentStatus
from deployments.ports import PortError, listening_pid, port_allocate, port_take_over
from tasks.command import LaunchError
from tasks.process import (
    SHUTDOWN_GRACE_SECONDS,
    signal_group,
    sigterm_means_shutdown,
    stop_group,
    stop_launched,
    supervision_lost,
    worker_shutting_down,
)
from tasks.publisher import Backoff, database_failed, retry_database
from tasks.swift_failures import last_error_line
from tasks.swift_output import LogSplitter

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
_UVICORN = re.compile(r"Uvicorn running on \w+://(?:\[[^\]]*\]|[^:\s]+):(\d+)")
_SIGNALS = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV", 2: "SIGINT"}


def claim(deployment_id: int) -> bool:
    """Atomically take a placed deployment for this worker; exactly one caller ever gets True, and
    only on the host that holds its reservation."""
    now = timezone.now()
    return Deployment.objects.filter(
        pk=deployment_id, status=DeploymentStatus.PENDING, host=settings.FINETUNE_HOST,
        stop_requested_at__isnull=True,
    ).update(
        status=DeploymentStatus.STARTING, started_at=now, heartbeat_at=Now(), runner_pid=os.getpid(),
        ready_at=None, stopped_at=None, exit_code=None, error_message="", pid=None, process_started=None,
    ) == 1


def uvicorn_port(line: str) -> int | None:
    """The port in swift's readiness line ``Uvicorn running on http://127.0.0.1:8101 (…)``."""
    match = _UVICORN.search(line)
    return int(match.group(1)) if match else None


def explain_exit(lines: list[str], exit_code: int | None, *, was_running: bool) -> str:
    error = last_error_line(lines)
    what = "The model server stopped unexpectedly" if was_running else "The model server failed to start"
    if exit_code is not None and exit_code > 128 and (256 - exit_code) in _SIGNALS:
        sig = 256 - exit_code
        hint = " (often the out-of-memory killer)" if sig == 9 else ""
        return f"{what}: it was killed by {_SIGNALS[sig]}{hint}.\nLast output: {error}"
    if exit_code is not None and exit_code < 0:
        return f"{what}: swift was killed by {_SIGNALS.get(-exit_code, f'signal {-exit_code}')}.\nLast output: {error}"
    if "out of memory" in "\n".join(lines[-200:]).lower():
        return f"{what}: the GPU ran out of memory. Use a GPU with more memory or a smaller model.\nswift said: {error}"
    if error:
        return f"{what} (exit code {exit_code}): {error}"
    return f"{what} (exit code {exit_code}) without printing an error."


class DeploymentRun:
    """The supervision of one claimed deployment."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.log = DeploymentLog(deployment)
        self.db = Backoff()  # a database outage pauses the stored log and the checks, never the server
        self.splitter = LogSplitter()
        self.tail_lines: deque[str] = deque(maxlen=400)
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_key = ""
        self.log_offset = 0
        self.bound_port: int | None = None
        self.ready = False
        self.failure = ""
        self.stop_signalled_at: float | None = None
        self.grace = settings.FINETUNE_STOP_GRACE_SECONDS
        self.killed = False

    # --- main -------------------------------------------------------------------------------
    def run(self) -> None:
        deployment = self.deployment
        log_path = Path(deployment.log_file_path)
        workdir = log_path.parent
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            launch = build_env(deployment, workdir=workdir)
            port = port_allocate(deployment=deployment)
            # Hex, never starting with "-" (argparse would read a leading dash as the next flag).
            self.api_key = secrets.token_hex(32)
            argv = build_argv(deployment, port=port, api_key=self.api_key, gpu_count=len(launch.devices))
        except (LaunchError, PortError, OSError) as exc:
            self.finish(DeploymentStatus.FAILED, error=str(exc))
            return
        self.log.secret = self.api_key
        shown = redact(argv, self.api_key)
        Deployment.objects.filter(pk=deployment.pk).update(api_key=self.api_key, command=shown)
        deployment.api_key, deployment.command = self.api_key, shown
        where = f"GPU {','.join(launch.devices)}" if launch.devices else "a CPU slot"
        self.log.note(f"Starting on {deployment.host} ({where}), port {port}")
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(shown)}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            try:
                self.proc = subprocess.Popen(  # noqa: S603 - argv list from the allow-list, no shell
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                    env=launch.env, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                self.finish(DeploymentStatus.FAILED, error=f"Could not start swift ({argv[0]}): {exc.strerror or exc}")
                return
        self.log.add([f"$ {shlex.join(shown)}"])
        try:
            started = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            started = None
        pid = self.proc.pid
        retry_database(lambda: Deployment.objects.filter(pk=deployment.pk).update(pid=pid, process_started=started),
                       what=f"Recording the process of deployment {deployment.pk}", backoff=self.db)
        deployment.pid, deployment.process_started = self.proc.pid, started
        self.supervise()

    def supervise(self) -> None:
        assert self.proc is not None
        poll = min(settings.FINETUNE_POLL_SECONDS, 0.1)
        ready_by = time.monotonic() + settings.FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS
        last_check = last_heartbeat = last_probe = 0.0
        while True:
            self.read_output()
            self.tolerating_outages(self.log.flush, "Storing the log")
            now = time.monotonic()
            if now - last_check >= 0.5:
                last_check = now
                self.tolerating_outages(self.check_stop_request, "Checking for a stop request")
            if now - last_heartbeat >= settings.FINETUNE_HEARTBEAT_SECONDS:
                last_heartbeat = now
                self.heartbeat()
            if not self.ready and self.stop_signalled_at is None:
                if self.bound_port is not None and now - last_probe >= 0.2:
                    last_probe = now
                    self.tolerating_outages(self.probe, "Checking readiness")
                elif now > ready_by:
                    self.tolerating_outages(lambda: self.fail_now(
                        f"The model server did not become ready within "
                        f"{settings.FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS:g} s."), "Failing")
            if self.stop_signalled_at is not None and not self.killed:
                if now - self.stop_signalled_at >= self.grace:
                    signal_group(self.proc.pid, signal.SIGKILL)
                    self.killed = True
            try:
                self.proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
        # The wrapper is gone; nothing of its group may outlive it (an orphaned server keeps the port).
        stop_group(self.proc.pid, grace=min(5.0, settings.FINETUNE_STOP_GRACE_SECONDS))
        self.read_output(final=True)
        self.conclude(self.proc.returncode)

    def tolerating_outages(self, step: Callable[[], None], what: str) -> None:
        """One database-touching step of the loop: while the database is away it is skipped (tried
        again after a backoff) instead of taking the model server down. A log flush that fails loses
        its lines from the stored log (the log file keeps them)."""
        if not self.db.ready():
            return
        try:
            step()
        except DatabaseError as exc:
            database_failed(exc, what=f"{what} of deployment {self.deployment.pk}", backoff=self.db)
            return
        self.db.succeeded()

    # --- output -----------------------------------------------------------------------------
    def read_output(self, *, final: bool = False) -> None:
        lines: list[str] = []
        try:
            with Path(self.deployment.log_file_path).open("rb") as handle:
                handle.seek(self.log_offset)
                while chunk := handle.read(_READ_CHUNK):
                    self.log_offset += len(chunk)
                    lines += self.splitter.feed(chunk)
        except FileNotFoundError:
            pass
        if final:
            lines += self.splitter.flush()
        if not lines:
            return
        self.tail_lines.extend(lines)
        self.log.add(lines)
        if self.bound_port is None:
            for line in lines:
                port = uvicorn_port(line)
                if port is not None:
                    self.bound_port = port
                    break

    # --- readiness --------------------------------------------------------------------------
    def probe(self) -> None:
        """The Uvicorn line was seen: make sure the port is ours, then wait for ``/v1/models``."""
        assert self.proc is not None and self.bound_port is not None
        deployment = self.deployment
        port = self.bound_port
        if port != deployment.port:
            allocated = deployment.port
            if not port_take_over(deployment=deployment, port=port):
                self.fail_now(
                    f"Port {allocated} was taken by another program before swift could bind it, and swift "
                    f"moved on to port {port}, which belongs to another deployment. Start the deployment again."
                )
                return
            self.log.note(f"Port {allocated} was taken by another program; swift moved to port {port}, "
                          "which is now this deployment's")
        if listening_pid(port, self.proc.pid) is None:
            return  # not listening yet (or not ours): keep waiting until the readiness timeout
        try:
            response = httpx.get(f"http://{HOST}:{port}/v1/models", timeout=2.0, trust_env=False,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
            names = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return
        if deployment.served_model_name not in names:
            return
        now = timezone.now()
        if Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.STARTING).update(
            status=DeploymentStatus.RUNNING, ready_at=now, port=port, heartbeat_at=Now()
        ):
            self.ready = True
            deployment.status, deployment.ready_at = DeploymentStatus.RUNNING, now
            self.log.note(f"Ready: serving {deployment.served_model_name!r} on {HOST}:{port}")

    def fail_now(self, reason: str) -> None:
        """Give up on a process that is still alive: stop its group and end ``failed``."""
        assert self.proc is not None
        self.failure = reason
        self.log.note(reason.splitlines()[0])
        signal_group(self.proc.pid, signal.SIGTERM)
        self.stop_signalled_at = time.monotonic()

    # --- control ----------------------------------------------------------------------------
    def check_stop_request(self) -> None:
        if self.stop_signalled_at is not None or self.proc is None:
            return
        if worker_shutting_down():
            self.grace = min(self.grace, SHUTDOWN_GRACE_SECONDS)
            self.fail_now(f"The worker on host {self.deployment.host} was shut down (Ctrl-C or SIGTERM); the model "
                          "server was stopped with it. Start the deployment again.")
            return
        if self.ready:
            from deployments.services import deployment_stop_idle

            deployment_stop_idle(deployment_id=self.deployment.pk)
        row = Deployment.objects.filter(pk=self.deployment.pk).values("stop_requested_at", "stop_reason").first()
        if row is None or row["stop_requested_at"] is not None:
            self.log.note((row or {}).get("stop_reason") or "Stop requested")
            signal_group(self.proc.pid, signal.SIGTERM)
            self.stop_signalled_at = time.monotonic()

    def heartbeat(self) -> None:
        try:
            # The database's clock, which every reconciler compares with (never this host's).
            Deployment.objects.filter(pk=self.deployment.pk).update(heartbeat_at=Now())
        except Exception:  # noqa: BLE001 - a database hiccup must not take the model down
            logger.warning("heartbeat for deployment %s failed; reconnecting", self.deployment.pk, exc_info=True)
            close_old_connections()

    # --- ending -----------------------------------------------------------------------------
    def conclude(self, returncode: int | None) -> None:
        if self.failure:
            self.finish(DeploymentStatus.FAILED, error=self.failure, exit_code=returncode)
        elif self.stop_signalled_at is not None:
            self.finish(DeploymentStatus.STOPPED, exit_code=returncode)
        else:
            reason = explain_exit(list(self.tail_lines), returncode, was_running=self.ready)
            self.finish(DeploymentStatus.FAILED, error=reason, exit_code=returncode)

    def finish(self, status: str, *, error: str = "", exit_code: int | None = None) -> None:
        from deployments.services import deployment_finish

        if error and error != self.failure:  # fail_now has already logged its reason
            self.log.add([f"[platform] {error.splitlines()[0]}"])
        try:
            self.log.flush(force=True)
        except Exception:  # noqa: BLE001 - the row may be gone (deleted); the ending matters more
            logger.warning("could not store the last log lines of deployment %s", self.deployment.pk, exc_info=True)
        retry_database(lambda: deployment_finish(deployment=self.deployment, status=status, error=error,
                                                 exit_code=exit_code),
                       what=f"Finishing deployment {self.deployment.pk} ({status})", backoff=self.db)

    def kill(self) -> None:
        """Leave no process of the group alive (used on every exit path)."""
        stop_launched(self.proc)


def run_deployment(deployment_id: int) -> str:
    """Claim a placed deployment and serve it until it is stopped or dies."""
    with sigterm_means_shutdown():
        return _run_deployment(deployment_id)


def _run_deployment(deployment_id: int) -> str:
    if not claim(deployment_id):
        return f"deployment {deployment_id}: not claimed (already taken, stopped or deleted)"
    deployment = Deployment.objects.get(pk=deployment_id)
    run = DeploymentRun(deployment)
    try:
        run.run()
    except BaseException as exc:
        logger.exception("runner for deployment %s crashed", deployment_id)
        run.kill()
        from deployments.services import deployment_finish

        deployment_finish(deployment=deployment, status=DeploymentStatus.FAILED,
                          error=f"The platform's runner failed: {type(exc).__name__}: {exc}")
        if not isinstance(exc, Exception):
            raise
    finally:
        run.kill()
    status = Deployment.objects.filter(pk=deployment_id).values_list("status", flat=True).first()
    return f"deployment {deployment_id}: {status or 'deleted'}"


def reconcile_host(*, host: str | None = None) -> list[int]:
    """Fail deployments whose supervision is gone, so none stays ``running`` on a dead process.

    On this host a deployment is lost when its runner (a worker process) is gone or silent for
    ``FINETUNE_LOST_AFTER_SECONDS``; the swift group it left behind (same pid *and* start time) is
    stopped. On another host it is lost when that host has been silent three times as long. A
    pending deployment placed on a host that went silent before claiming it goes back to the queue.
    Returns the ids marked failed.
    """

    from deployments.services import deployment_finish
    from gpus.models import Host
    from gpus.services import reservations_release
    from tasks.scheduler import dispatch_on_commit

    host = host or settings.FINETUNE_HOST
    failed: list[int] = []
    active = Deployment.objects.filter(status__in=[DeploymentStatus.STARTING, DeploymentStatus.RUNNING])
    # Silence by the database's clock, never this host's: heartbeats are stamped with it too.
    for deployment in active.annotate(silent_for=Now() - F("heartbeat_at")):
        lost = supervision_lost(
            holder_host=deployment.host, runner_pid=deployment.runner_pid, claimed_at=deployment.started_at,
            silent_for=float("inf") if deployment.silent_for is None else deployment.silent_for.total_seconds(),
            pid=deployment.pid, process_started=deployment.process_started, this_host=host,
            stale_after=settings.FINETUNE_LOST_AFTER_SECONDS,
        )
        if lost is None:
            continue
        here, silent_for = lost
        if here:
            reason = ("The worker supervising this deployment stopped (worker crash or restart); its model "
                      "server was stopped and its GPU and port were freed. Start it again.")
        else:
            reason = (f"Host {deployment.host or '?'} stopped reporting for {int(silent_for)} s (host down or its "
                      "worker stopped); the deployment is considered lost.")
        if deployment_finish(deployment=deployment, status=DeploymentStatus.FAILED, error=reason):
            failed.append(deployment.pk)
    live = set(Host.objects.live().values_list("name", flat=True))
    stranded = Deployment.objects.filter(status=DeploymentStatus.PENDING).exclude(host="").exclude(host__in=live)
    for deployment in stranded:
        with transaction.atomic():
            moved = Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.PENDING,
                                              host=deployment.host).update(host="")
            if moved:
                reservations_release(deployment_id=deployment.pk)
        if moved:
            dispatch_on_commit()
    return failed

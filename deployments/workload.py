"""A deployment's model server as a workload of the one supervisor (:mod:`gpus.supervisor`).

What is its own: a port from :mod:`deployments.ports` and a random API key (swift requires one; only
the gateway uses it, and it is replaced by ``***`` in the stored command and log), swift bound to
this host's ``FINETUNE_HOST_ADDRESS`` (127.0.0.1 by default); readiness — the Uvicorn line names the
port swift really bound (swift silently moves on when the port is busy), that port must be held by
our own process group, and ``/v1/models`` at that address must answer with the served name — then
``starting → running``; the idle stop; and what an exit means.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.db import DatabaseError
from django.urls import reverse
from django.utils import timezone

from core.swift_cli.failures import last_error_line
from deployments.command import bind_address, build_argv, build_env, http_host, redact
from deployments.logs import DeploymentLog, deployment_changed
from deployments.models import Deployment, DeploymentStatus
from deployments.ports import listening_pid, port_allocate, port_take_over
from deployments.services import deployment_finish, deployment_purge, deployment_stop_idle
from gpus.models import Run, RunStatus
from gpus.outage import Backoff, database_failed
from gpus.workloads import Launch, Outcome, Workload, holder_view, register

_UVICORN = re.compile(r"Uvicorn running on \w+://(?:\[[^\]]*\]|[^:\s]+):(\d+)")
_SIGNALS = {9: "SIGKILL", 15: "SIGTERM", 6: "SIGABRT", 11: "SIGSEGV", 2: "SIGINT"}


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


def _not_ready() -> str:
    return f"The model server did not become ready within {settings.FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS:g} s."


@register
class DeployWorkload(Workload):
    kind = "deploy"
    noun = "deployment"
    supervisor_gone = ("The worker supervising this deployment stopped (worker crash or restart); its model server "
                       "was stopped and its GPU and port were freed. Start it again.")

    def __init__(self, run: Run, supervisor: Any) -> None:
        super().__init__(run, supervisor)
        self.deployment = Deployment.objects.get(pk=run.subject_id)
        self.log = DeploymentLog(self.deployment)
        self.db = Backoff()  # a database outage pauses the stored log and the probes, never the server
        self.api_key = ""
        self.bound_port: int | None = None
        self.ready = False
        self.ready_by = 0.0
        self.last_probe = 0.0
        self.last_idle_check = 0.0

    def claimed(self) -> None:
        Deployment.objects.filter(pk=self.deployment.pk, status=DeploymentStatus.PENDING).update(
            status=DeploymentStatus.STARTING, ready_at=None
        )
        self.deployment.status = DeploymentStatus.STARTING
        deployment_changed(self.deployment)

    def prepare(self) -> Launch:
        deployment = self.deployment
        workdir = Path(deployment.log_file_path).parent
        workdir.mkdir(parents=True, exist_ok=True)
        launch = build_env(self.run, workdir=workdir)
        port = port_allocate(deployment=deployment)  # PortError is a LaunchError
        # Hex, never starting with "-" (argparse would read a leading dash as the next flag).
        self.api_key = secrets.token_hex(32)
        argv = build_argv(deployment, port=port, api_key=self.api_key, gpu_count=len(launch.devices))
        self.log.secret = self.api_key
        Deployment.objects.filter(pk=deployment.pk).update(api_key=self.api_key)
        deployment.api_key = self.api_key
        where = f"GPU {','.join(launch.devices)}" if launch.devices else "a CPU slot"
        self.log.note(f"Starting on {self.run.host} ({where}), port {port}")
        shown = redact(argv, self.api_key)
        self.log.add([f"$ {' '.join(shown)}"])
        self.ready_by = time.monotonic() + settings.FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS
        return Launch(argv=argv, env=launch.env, workdir=workdir, shown=shown)

    def take_lines(self, lines: list[str]) -> None:
        self.log.add(lines)
        if self.bound_port is None:
            for line in lines:
                port = uvicorn_port(line)
                if port is not None:
                    self.bound_port = port
                    break

    def flush(self, *, force: bool = False) -> bool:
        if not self.db.ready():
            return False
        try:
            self.log.flush(force=force)
        except DatabaseError as exc:  # the lines stay buffered; written at the next try
            database_failed(exc, what=f"Storing the log of deployment {self.deployment.pk}", backoff=self.db)
            return False
        self.db.succeeded()
        return True

    def tick(self) -> str | None:
        now = time.monotonic()
        if self.ready:
            if now - self.last_idle_check >= 0.5 and self.db.ready():
                self.last_idle_check = now
                try:
                    deployment_stop_idle(deployment_id=self.deployment.pk)
                except DatabaseError as exc:
                    database_failed(exc, what="Checking whether the deployment is idle", backoff=self.db)
            return None
        if self.bound_port is not None and now - self.last_probe >= 0.2 and self.db.ready():
            self.last_probe = now
            try:
                return self.probe()
            except DatabaseError as exc:
                database_failed(exc, what=f"Checking the readiness of deployment {self.deployment.pk}",
                                backoff=self.db)
                return None
        if self.bound_port is None and now > self.ready_by:
            return _not_ready()
        return None

    def probe(self) -> str | None:
        """The Uvicorn line was seen: make sure the port is ours, then wait for ``/v1/models``."""
        proc = self.supervisor.proc
        assert proc is not None and self.bound_port is not None
        deployment = self.deployment
        port = self.bound_port
        if port != deployment.port:
            allocated = deployment.port
            if not port_take_over(deployment=deployment, port=port):
                return (f"Port {allocated} was taken by another program before swift could bind it, and swift "
                        f"moved on to port {port}, which belongs to another deployment. Start the deployment again.")
            self.log.note(f"Port {allocated} was taken by another program; swift moved to port {port}, "
                          "which is now this deployment's")
        if time.monotonic() > self.ready_by:
            return _not_ready()
        if listening_pid(port, proc.pid) is None:
            return None  # not listening yet (or not ours): keep waiting until the readiness timeout
        try:
            # The address the gateway uses too (the one swift was told to bind to).
            response = httpx.get(f"http://{http_host(bind_address())}:{port}/v1/models", timeout=2.0, trust_env=False,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
            names = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if deployment.served_model_name not in names:
            return None
        now = timezone.now()
        if Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.STARTING, run_id=self.run.pk).update(
            status=DeploymentStatus.RUNNING, ready_at=now, port=port
        ):
            self.ready = True
            deployment.status, deployment.ready_at = DeploymentStatus.RUNNING, now
            deployment_changed(deployment)
            self.log.note(f"Ready: serving {deployment.served_model_name!r} on {http_host(bind_address())}:{port}")
        return None

    def stop_note(self, reason: str) -> None:
        if reason == "Stop requested":
            reason = Deployment.objects.filter(pk=self.deployment.pk).values_list(
                "stop_reason", flat=True).first() or reason
        try:
            self.log.note(reason.splitlines()[0])
        except DatabaseError:
            self.log.add([reason.splitlines()[0]])  # stored with the next flush

    def conclude(self, exit_code: int | None, *, stopped: bool, shutdown: bool, failure: str,
                 tail: Sequence[str]) -> Outcome:
        if shutdown:
            return Outcome(RunStatus.FAILED, exit_code, (
                f"The worker on host {self.run.host} was shut down (Ctrl-C or SIGTERM); the model server was "
                "stopped with it. Start the deployment again."))
        if failure:
            return Outcome(RunStatus.FAILED, exit_code, failure)
        if stopped:
            return Outcome(RunStatus.STOPPED, exit_code)
        return Outcome(RunStatus.FAILED, exit_code, explain_exit(list(tail), exit_code, was_running=self.ready))

    def ended(self, outcome: Outcome) -> None:
        if outcome.error and outcome.error != self.supervisor.failure:  # a failure was noted when it stopped
            self.log.add([f"[platform] {outcome.error.splitlines()[0]}"])
        self.log.flush(force=True)
        deployment_finish(deployment=self.deployment, status=(
            DeploymentStatus.STOPPED if outcome.status == RunStatus.STOPPED else DeploymentStatus.FAILED))

    def after(self, outcome: Outcome) -> None:
        row = Deployment.objects.filter(pk=self.deployment.pk).first()
        if row is not None and row.delete_requested_at is not None:
            deployment_purge(deployment=row)

    # --- without a supervisor -----------------------------------------------------------------
    @classmethod
    def booked(cls, run: Run, where: str) -> None:
        # The port constraint is per host among active deployments: the host is the deployment's too.
        deployment = Deployment.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if deployment is not None:
            Deployment.objects.filter(pk=deployment.pk).update(host=run.host)
            deployment_changed(deployment)

    @classmethod
    def requeued(cls, run: Run, reason: str) -> None:
        Deployment.objects.filter(pk=run.subject_id, run_id=run.pk, status=DeploymentStatus.PENDING).update(host="")

    @classmethod
    def waiting(cls, run: Run, reason: str) -> None:
        # The reason lives on the run (``deployment.wait_reason`` reads it): the page reads it again.
        deployment = Deployment.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if deployment is not None:
            deployment_changed(deployment)

    @classmethod
    def failed_unsupervised(cls, run: Run, reason: str) -> None:
        deployment = Deployment.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if deployment is not None and deployment_finish(deployment=deployment, status=DeploymentStatus.FAILED):
            row = Deployment.objects.filter(pk=deployment.pk).first()
            if row is not None and row.delete_requested_at is not None:
                deployment_purge(deployment=row)

    @classmethod
    def holders(cls, runs: Sequence[Run], user: Any) -> dict[int, dict[str, Any]]:
        rows = dict(Deployment.objects.filter(pk__in=[r.subject_id for r in runs]).values_list("pk", "status"))
        out = {}
        for run in runs:
            status = rows.get(run.subject_id, "")
            out[run.pk] = holder_view(
                "deployment", run, user, name=run.label.split(" ", 1)[-1], status=status,  # "#<id> <name>"
                status_label=str(dict(DeploymentStatus.choices).get(status, status)),
                url=reverse("deployment_detail", args=[run.subject_id]),
            )
        return out

    @classmethod
    def holder(cls, run: Run, user: Any) -> dict[str, Any]:
        return cls.holders([run], user)[run.pk]

"""Fixtures of the deployment tests: a private port range, runners in threads, a live daphne server."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from deployments.models import Deployment
from deployments.ports import port_is_free
from deployments.services import deployment_stop
from gpus.models import Run
from gpus.process import process_matches, stop_group
from gpus.scheduler import dispatch
from tests.conftest import REPO, _database_url, stop_server, wait_for
from tests.runs import run_deployment


def free_port_block(size: int = 20) -> tuple[int, int]:
    """A block of ports nothing listens on, away from the defaults, so parallel runs do not meet."""
    for _ in range(200):
        low = random.randrange(30000, 45000)
        if all(port_is_free(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free block of ports")


def nothing_listens(port: int) -> bool:
    """True when no server accepts connections on 127.0.0.1:``port`` (a closed server's port may still
    sit in TIME_WAIT for a minute, which a plain bind would count as busy)."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def deploy_ports(settings: Any) -> tuple[int, int]:
    settings.FINETUNE_DEPLOY_PORTS = free_port_block()
    return settings.FINETUNE_DEPLOY_PORTS


class Runners:
    """Runs deployments' supervision in threads (what a worker process does), and cleans up."""

    def __init__(self) -> None:
        self.threads: dict[int, threading.Thread] = {}
        self.results: dict[int, str] = {}

    def start(self, deployment_id: int) -> threading.Thread:
        def target() -> None:
            try:
                self.results[deployment_id] = run_deployment(deployment_id)
            finally:
                connection.close()

        thread = threading.Thread(target=target, name=f"deploy-{deployment_id}", daemon=True)
        thread.start()
        self.threads[deployment_id] = thread
        return thread

    def dispatch_and_start(self, deployment: Deployment) -> Deployment:
        dispatch()  # (creation dispatched already when on_commit callbacks run; this is idempotent)
        deployment.refresh_from_db()
        assert deployment.host, f"deployment {deployment.pk} was not placed"
        self.start(deployment.pk)
        return deployment

    def join(self, deployment_id: int, timeout: float = 30) -> str:
        self.threads[deployment_id].join(timeout)
        assert not self.threads[deployment_id].is_alive(), "the runner did not end"
        return self.results.get(deployment_id, "")


def wait_status(deployment: Deployment, *statuses: str, timeout: float = 30) -> Deployment:
    def reached() -> Deployment | None:
        row = Deployment.objects.filter(pk=deployment.pk).first()
        return row if row is not None and row.status in statuses else None

    return wait_for(reached, timeout=timeout, interval=0.1)


def kill_leftovers() -> None:
    for row in Run.objects.filter(kind="deploy").exclude(pid__isnull=True):
        if process_matches(row.pid, row.process_started):
            stop_group(row.pid, grace=2)


@pytest.fixture
def runners(
    transactional_db: None, deploy_ports: tuple[int, int], fake_swift: Callable[..., None]
) -> Iterator[Runners]:
    """Start runners with ``runners.dispatch_and_start(deployment)``; everything is stopped after."""
    box = Runners()
    yield box
    for deployment in Deployment.objects.filter(pk__in=list(box.threads)):
        deployment_stop(deployment=deployment)
    for thread in box.threads.values():
        thread.join(30)
    kill_leftovers()


@pytest.fixture
def live_server_url(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """The real ASGI application under daphne, on the test database."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": _database_url(), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    log = (tmp_path / "daphne.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                             "finetune_platform.asgi:application"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: not port_is_free(port) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, (tmp_path / "daphne.log").read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc, timeout=10)
        text = (tmp_path / "daphne.log").read_text(errors="replace")
        if "Traceback" in text:  # shown with the test's output when it fails
            print("daphne log:\n" + "\n".join(line for line in text.splitlines() if "HTTP Request" not in line))


@pytest.fixture
def stop_all_deployments(worker: Callable[..., Any]) -> Iterator[None]:
    """For tests with a real worker: stop every deployment (through the service, so the worker's
    runner ends it) before the worker goes, and kill any group left behind."""
    yield
    for deployment in Deployment.objects.active():
        deployment_stop(deployment=deployment)
    try:
        wait_for(lambda: not Deployment.objects.active().exists(), timeout=30)
    finally:
        kill_leftovers()


__all__ = ["Runners", "free_port_block", "kill_leftovers", "nothing_listens", "wait_status"]

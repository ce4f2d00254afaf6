"""The deployment runner with the fake ``swift deploy`` (an OpenAI-compatible server that behaves
like swift's: key required, silently moves to the next port when its port is busy): start, ready,
stop, ports under concurrency and foreign processes, crashes of the model and of the worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection

from deployments import ports, services
from deployments.models import Deployment, DeploymentLogLine, DeploymentStatus
from deployments.ports import listening_pid, port_allocate, port_is_free
from gpus import supervisor
from gpus.models import Reservation, Run, RunStatus
from gpus.process import group_members
from gpus.scheduler import dispatch
from tests.conftest import FAKE_SWIFT, announce_host, wait_for
from tests.deployments.conftest import Runners, nothing_listens, wait_status
from tests.runs import run_deployment

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def host(transactional_db: None) -> Any:
    return announce_host(cpu=2)


@pytest.fixture
def make(alice: User, local_model: Path, host: Any) -> Callable[..., Deployment]:
    def create(name: str = "fake", **kwargs: Any) -> Deployment:
        return services.deployment_create(owner=alice, name=name, model="fake-model",
                                          gpu_config={"cpu": True}, **kwargs)

    return create


def assert_port_free_and_group_gone(row: Deployment) -> None:
    assert row.port is not None and nothing_listens(row.port)
    assert row.pid is not None and group_members(row.pid) == []
    assert not Reservation.objects.filter(run=row.run_id).exists()


def test_a_deployment_starts_serves_on_its_own_port_and_stops_leaving_nothing(
    runners: Runners, make: Callable[..., Deployment], deploy_ports: tuple[int, int]
) -> None:
    deployment = runners.dispatch_and_start(make())
    row = wait_status(deployment, DeploymentStatus.RUNNING)
    low, high = deploy_ports
    assert low <= row.port <= high and row.ready_at is not None and row.host == settings.FINETUNE_HOST
    assert listening_pid(row.port, row.pid) is not None  # the port is held by its own process group
    conn = next(c for c in psutil.Process(listening_pid(row.port, row.pid)).net_connections("tcp")
                if c.laddr.port == row.port)
    assert conn.laddr.ip == "127.0.0.1"  # never reachable from outside the host
    models = httpx.get(f"http://127.0.0.1:{row.port}/v1/models", trust_env=False).json()
    assert [m["id"] for m in models["data"]] == [row.served_model_name]
    # The swift process itself refuses a call without its key (swift answers 400 "API key error").
    direct = httpx.post(f"http://127.0.0.1:{row.port}/v1/chat/completions", trust_env=False,
                        json={"model": row.served_model_name, "messages": [{"role": "user", "content": "hi"}]})
    assert direct.status_code == 400 and "API key" in direct.text
    # The key is random, in the argv only as ***, and never in the stored log.
    assert len(row.api_key) >= 32 and row.command[row.command.index("--api_key") + 1] == "***"
    # Lines keep arriving (the refused call above is logged): read the row first, then the lines; the
    # lines up to the row's last_log_seq were written with it, so they are all there, contiguous.
    row.refresh_from_db()
    lines = list(DeploymentLogLine.objects.filter(deployment=row).order_by("seq").values_list("seq", "text"))
    seqs, texts = [seq for seq, _ in lines], [text for _, text in lines]
    assert seqs == list(range(1, len(seqs) + 1)) and 0 < row.last_log_seq <= len(seqs)
    assert any("Uvicorn running on" in t for t in texts) and any(t.startswith("[platform] Ready") for t in texts)
    assert not any(row.api_key in t for t in texts) and any("api_key='***'" in t for t in texts)
    assert row.api_key not in Path(row.log_file_path).read_text().split("\n", 1)[0]  # the "$ command" line

    services.deployment_stop(deployment=row)
    assert "stopped" in runners.join(row.pk)
    row.refresh_from_db()
    assert row.status == DeploymentStatus.STOPPED and row.stopped_at is not None and row.stop_reason
    assert_port_free_and_group_gone(row)


def test_a_second_delivery_of_the_job_is_a_no_op(runners: Runners, make: Callable[..., Deployment]) -> None:
    deployment = runners.dispatch_and_start(make())
    wait_status(deployment, DeploymentStatus.RUNNING)
    assert "not claimed" in run_deployment(deployment.pk)
    assert supervisor.claim(deployment.run_id) is None


def test_a_deployment_on_another_host_is_not_claimed_here(make: Callable[..., Deployment]) -> None:
    deployment = make()
    Run.objects.filter(pk=deployment.run_id).update(status=RunStatus.QUEUED, host="elsewhere")
    assert supervisor.claim(deployment.run_id) is None


def test_two_deployments_started_concurrently_get_different_ports(
    runners: Runners, make: Callable[..., Deployment]
) -> None:
    first, second = make("one"), make("two")
    dispatch()
    assert Deployment.objects.filter(host=settings.FINETUNE_HOST, status="pending").count() == 2
    runners.start(first.pk)
    runners.start(second.pk)
    rows = [wait_status(d, DeploymentStatus.RUNNING) for d in (first, second)]
    assert rows[0].port != rows[1].port
    for row in rows:
        assert listening_pid(row.port, row.pid) is not None


def test_concurrent_allocators_never_hand_out_one_port_twice(
    transactional_db: None, alice: User, deploy_ports: tuple[int, int]
) -> None:
    rows = [Deployment.objects.create(owner=alice, name=f"d{i}", status=DeploymentStatus.STARTING,
                                      host=settings.FINETUNE_HOST) for i in range(8)]
    got: dict[int, int] = {}
    barrier = threading.Barrier(len(rows))

    def allocate(row: Deployment) -> None:
        try:
            barrier.wait()
            got[row.pk] = port_allocate(deployment=row)
        finally:
            connection.close()

    threads = [threading.Thread(target=allocate, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(got) == 8 and len(set(got.values())) == 8
    stored = list(Deployment.objects.values_list("port", flat=True))
    assert sorted(stored) == sorted(got.values())
    # An ended deployment's port is free for the next one: the constraint covers active ones only.
    ended = rows[0]
    Deployment.objects.filter(pk=ended.pk).update(status=DeploymentStatus.STOPPED)
    newcomer = Deployment.objects.create(owner=alice, name="new", status=DeploymentStatus.STARTING,
                                         host=settings.FINETUNE_HOST)
    assert port_allocate(deployment=newcomer) == got[ended.pk]


def test_a_port_a_foreign_process_listens_on_is_skipped(
    runners: Runners, make: Callable[..., Deployment], deploy_ports: tuple[int, int]
) -> None:
    low, _ = deploy_ports
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(low), "--bind", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not port_is_free(low), timeout=20)
        row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.RUNNING)
        assert row.port != low and listening_pid(row.port, row.pid) is not None
    finally:
        foreign.kill()
        foreign.wait()


def test_a_port_taken_after_allocation_is_detected_and_the_real_port_recorded(
    runners: Runners, make: Callable[..., Deployment], deploy_ports: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A foreign process takes the port between the platform's check and swift's bind: swift moves to
    the next port (as real swift does); the runner reads the port from the Uvicorn line, owns it."""
    low, _ = deploy_ports
    monkeypatch.setattr(ports, "port_is_free", lambda port: True)  # the check ran before the foreigner came
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", low))
        foreign.listen()
        row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.RUNNING)
        assert row.port == low + 1 and listening_pid(low + 1, row.pid) is not None
        texts = DeploymentLogLine.objects.filter(deployment=row).values_list("text", flat=True)
        assert any(f"Port {low} was taken by another program" in t for t in texts)


def test_a_moved_port_that_belongs_to_another_deployment_fails_clearly(
    runners: Runners, make: Callable[..., Deployment], deploy_ports: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch, alice: User,
) -> None:
    low, _ = deploy_ports
    # Another deployment holds low + 1 in the database (its own swift has not bound it yet).
    Deployment.objects.create(owner=alice, name="holder", status=DeploymentStatus.STARTING,
                              host=settings.FINETUNE_HOST, port=low + 1)
    monkeypatch.setattr(ports, "port_is_free", lambda port: True)
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", low))
        foreign.listen()
        deployment = runners.dispatch_and_start(make())
        row = wait_status(deployment, DeploymentStatus.FAILED)
    assert "belongs to another deployment" in row.error_message
    assert row.ready_at is None and group_members(row.pid) == []
    assert not Reservation.objects.filter(run=row.run_id).exists()


def test_a_deployment_whose_process_dies_is_failed_and_frees_its_slot_and_port(
    runners: Runners, make: Callable[..., Deployment], fake_swift: Callable[..., None]
) -> None:
    fake_swift(spawn_child=1)  # like real swift: a wrapper and the server as its child
    row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.RUNNING)
    server = listening_pid(row.port, row.pid)
    assert server is not None and server != row.pid
    waiting = make("waiting")  # both CPU slots: one busy, then this one takes the second
    os.kill(server, signal.SIGKILL)  # e.g. the out-of-memory killer
    row = wait_status(row, DeploymentStatus.FAILED)
    assert "killed by SIGKILL" in row.error_message and row.exit_code == 247
    assert_port_free_and_group_gone(row)
    waiting.refresh_from_db()
    assert waiting.host == settings.FINETUNE_HOST  # the freed slot went to the queue


def test_a_failed_start_ends_failed_with_swifts_error(
    runners: Runners, make: Callable[..., Deployment], fake_swift: Callable[..., None]
) -> None:
    fake_swift(exit_code=3)
    row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.FAILED)
    assert row.error_message.startswith("The model server failed to start (exit code 3)")
    assert "ValueError: fake failure requested" in row.error_message
    assert not Reservation.objects.filter(run=row.run_id).exists()


def test_a_server_that_never_becomes_ready_is_stopped_and_failed(
    runners: Runners, make: Callable[..., Deployment], fake_swift: Callable[..., None], settings: Any
) -> None:
    settings.FINETUNE_DEPLOY_READY_TIMEOUT_SECONDS = 1.0
    fake_swift(startup_seconds=30)
    row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.FAILED)
    assert "did not become ready within 1 s" in row.error_message
    assert group_members(row.pid) == []


def test_an_idle_deployment_stops_itself_when_configured(
    runners: Runners, make: Callable[..., Deployment], settings: Any
) -> None:
    settings.FINETUNE_DEPLOY_IDLE_MINUTES = 0.02  # 1.2 s
    row = wait_status(runners.dispatch_and_start(make()), DeploymentStatus.RUNNING)
    row = wait_status(row, DeploymentStatus.STOPPED, timeout=30)
    assert "without requests" in row.stop_reason
    assert_port_free_and_group_gone(row)


def test_reconcile_fails_a_deployment_whose_worker_died_and_stops_its_group(
    transactional_db: None, alice: User, host: Any, deploy_ports: tuple[int, int], local_model: Path, tmp_path: Path
) -> None:
    """What a worker crash leaves: a running row whose runner process is gone and a swift group
    that kept the port (it runs in its own session)."""
    deployment = services.deployment_create(owner=alice, name="orphan", model="fake-model", gpu_config={"cpu": True})
    dispatch()
    port = deploy_ports[0]
    proc = subprocess.Popen([sys.executable, str(FAKE_SWIFT), "deploy", "--host", "127.0.0.1", "--port", str(port),
                             "--api_key", "k", "--model", str(local_model)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = subprocess.Popen(["true"])
    dead.wait()
    Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.RUNNING, port=port)
    assert Run.objects.filter(pk=deployment.run_id, host=settings.FINETUNE_HOST).update(
        status=RunStatus.RUNNING, pid=proc.pid, process_started=psutil.Process(proc.pid).create_time(),
        runner_pid=dead.pid,
    )
    wait_for(lambda: not port_is_free(port), timeout=20)
    assert supervisor.reconcile() == [deployment.run_id]
    proc.wait(timeout=10)
    row = Deployment.objects.get(pk=deployment.pk)
    assert row.status == DeploymentStatus.FAILED and "worker supervising this deployment stopped" in row.error_message
    assert_port_free_and_group_gone(row)
    assert supervisor.reconcile() == []  # once


def test_reconcile_requeues_a_deployment_placed_on_a_host_that_went_silent(
    transactional_db: None, alice: User, host: Any, local_model: Path
) -> None:
    from gpus.models import Host

    announce_host(name="gone-host", cpu=1)
    Host.objects.filter(name=settings.FINETUNE_HOST).update(enabled=False)
    deployment = services.deployment_create(owner=alice, name="stranded", model="fake-model", gpu_config={"cpu": True})
    dispatch()
    deployment.refresh_from_db()
    assert deployment.host == "gone-host"
    Host.objects.filter(name="gone-host").update(last_seen_at=None)
    Host.objects.filter(name=settings.FINETUNE_HOST).update(enabled=True)
    assert supervisor.requeue_stranded() == [deployment.run_id]
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.PENDING
    assert deployment.host == settings.FINETUNE_HOST  # back in the queue, then placed on a live host

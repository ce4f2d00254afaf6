"""A real worker process (``manage.py worker``) runs deployments; when it crashes, the deployment's
model server (its own session, so it survives the worker) is found, stopped and failed by the next
worker's start-up reconciliation, and its slot and port are freed."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from deployments.models import Deployment, DeploymentStatus
from deployments.ports import listening_pid
from gpus.models import Reservation
from gpus.process import group_members
from tests.conftest import announce_host, wait_for
from tests.deployments.conftest import nothing_listens

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


def test_a_worker_crash_fails_the_deployment_and_frees_its_port_and_slot(
    worker: Callable[..., Any], stop_all_deployments: None, alice_api: APIClient, local_model: Path,
    fake_swift: Callable[..., None], deploy_ports: tuple[int, int],
) -> None:
    ports = f"{deploy_ports[0]}-{deploy_ports[1]}"
    first = worker(FINETUNE_CPU_SLOTS="1", FINETUNE_DEPLOY_PORTS=ports)
    announce_host(cpu=1)
    response = alice_api.post("/api/deployments/", {"name": "fake", "model": "fake-model", "gpu_config": {"cpu": True}},
                              format="json")
    assert response.status_code == 201, response.content
    pk = response.json()["id"]
    row = wait_for(lambda: Deployment.objects.filter(pk=pk, status=DeploymentStatus.RUNNING).first(), timeout=90)
    assert listening_pid(row.port, row.pid) is not None

    os.killpg(first.pid, signal.SIGKILL)  # the worker and its django-q2 processes die at once
    first.wait(timeout=10)
    assert group_members(row.pid) and not nothing_listens(row.port)  # swift survived: it has its own session

    worker(FINETUNE_CPU_SLOTS="1", FINETUNE_DEPLOY_PORTS=ports)
    failed = wait_for(lambda: Deployment.objects.filter(pk=pk, status=DeploymentStatus.FAILED).first(), timeout=90)
    assert "worker supervising this deployment stopped" in failed.error_message
    wait_for(lambda: not group_members(row.pid), timeout=30)
    assert nothing_listens(row.port)
    assert not Reservation.objects.filter(run_id=row.run_id).exists()

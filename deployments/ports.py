"""Ports for model servers: allocated atomically from ``FINETUNE_DEPLOY_PORTS``, verified on the host.

The database decides who owns a port: ``(host, port)`` is unique among active deployments (a
conditional unique constraint), so two runners that pick the same port concurrently cannot both
record it — the loser gets an IntegrityError and moves on. The operating system decides whether a
port is usable: a port a foreign process listens on is skipped. Because a foreign process can still
take the port between that check and swift's bind (swift then silently moves to the next free port),
the runner reads the real port from swift's Uvicorn line, records it the same way, and checks that
the listening socket belongs to its own process group before the deployment counts as running.
"""

from __future__ import annotations

import socket

import psutil
from django.conf import settings
from django.db import IntegrityError, transaction

from core.swift_cli.env import LaunchError
from deployments.models import Deployment, DeploymentStatus
from gpus.process import group_members


class PortError(LaunchError):
    """No port could be had; the message is shown to the user."""


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` (checked the way swift does: bind on all interfaces,
    and on the loopback address the server will use)."""
    for address in ("", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def _record(deployment_id: int, port: int) -> bool | None:
    """Record ``port`` for a starting deployment. True: ours now. False: another active deployment
    on this host has it. None: the deployment is no longer starting (stopped meanwhile)."""
    try:
        with transaction.atomic():
            changed = Deployment.objects.filter(pk=deployment_id, status=DeploymentStatus.STARTING).update(port=port)
    except IntegrityError:
        return False
    return True if changed else None


def port_allocate(*, deployment: Deployment) -> int:
    """Give a starting deployment the lowest port of the range that no active deployment on this
    host holds and nothing on the host listens on. Raises PortError."""
    low, high = settings.FINETUNE_DEPLOY_PORTS
    used = set(
        Deployment.objects.active().filter(host=deployment.host, port__isnull=False)
        .exclude(pk=deployment.pk).values_list("port", flat=True)
    )
    for port in range(low, high + 1):
        if port in used or not port_is_free(port):
            continue
        recorded = _record(deployment.pk, port)
        if recorded:
            deployment.port = port
            return port
        if recorded is None:
            raise PortError("the deployment stopped before it got a port")
    raise PortError(f"no free port in {low}-{high} on {deployment.host}: every port is used by another "
                    "deployment or another program (FINETUNE_DEPLOY_PORTS sets the range)")


def port_take_over(*, deployment: Deployment, port: int) -> bool:
    """swift moved to ``port`` (its allocated one was taken by someone else before it bound):
    record the new port if no other deployment holds it. False if one does."""
    recorded = _record(deployment.pk, port)
    if recorded:
        deployment.port = port
    return bool(recorded)


def listening_pid(port: int, pgid: int) -> int | None:
    """The pid of a process of group ``pgid`` that listens on ``port`` (None: none of ours does)."""
    for proc in group_members(pgid):
        try:
            connections = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return proc.pid
    return None

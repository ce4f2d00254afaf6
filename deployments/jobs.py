"""django-q2 entry points. Thin on purpose: each calls one function that holds the logic."""

from __future__ import annotations

from deployments import runner, services


def run_deployment(deployment_id: int) -> str:
    """Start a placed deployment and supervise it until it stops (it holds a worker process)."""
    return runner.run_deployment(deployment_id)


def sweep() -> str:
    """Part of every host's periodic sweep: fail deployments whose runner is gone (their GPUs and
    ports are freed), put deployments stranded on a silent host back in the queue, stop idle ones."""
    lost = runner.reconcile_host()
    idle = services.deployment_stop_idle()
    return f"deployments lost={lost} idle={idle}"

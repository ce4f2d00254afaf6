"""django-q2 entry points. Thin on purpose: each calls one function that holds the logic."""

from __future__ import annotations

from gpus import scheduler, supervisor
from gpus.services import reservations_release_orphans


def run(run_id: int) -> str:
    """Claim and supervise one run of any kind to its end (minutes for an export, days for a training
    run, as long as a deployment serves)."""
    return supervisor.run_job(run_id)


def sweep() -> str:
    """Periodic safety net (every host's worker runs it): fail or mark lost the runs whose supervision
    is gone, put runs stranded on a silent host back in the queue, free reservations whose run ended,
    then start what fits."""
    lost = supervisor.reconcile()
    requeued = supervisor.requeue_stranded()
    orphans = reservations_release_orphans()
    queued = scheduler.dispatch()
    return f"lost={lost} requeued={requeued} orphans={orphans} queued={queued}"

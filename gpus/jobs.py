"""django-q2 entry points. Thin on purpose: each calls one function that holds the logic."""

from __future__ import annotations

import logging

from django.conf import settings

from gpus import scheduler, supervisor
from gpus.services import reservations_release_orphans
from gpus.workloads import registered_workloads

logger = logging.getLogger(__name__)


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
    for workload in registered_workloads():  # each kind's own upkeep (a task's disk use, issue 12)
        try:
            workload.swept(settings.FINETUNE_HOST)
        except Exception:  # noqa: BLE001 - upkeep must not stop the sweep; the next one retries
            logger.exception("the sweep's upkeep of %s runs failed", workload.kind)
    return f"lost={lost} requeued={requeued} orphans={orphans} queued={queued}"

"""django-q2 entry points. Thin on purpose: each calls one function that holds the logic."""

from __future__ import annotations

from deployments import jobs as deployment_jobs
from gpus.services import reservations_release_orphans
from tasks import exports, runner, scheduler


def run_task(task_id: int) -> str:
    """Run one queued task to its end (hours or days)."""
    return runner.run_task(task_id)


def run_export(export_id: int) -> str:
    """Merge one checkpoint's LoRA adapters into a full model (``swift export``; seconds to minutes)."""
    return exports.run_export(export_id)


def sweep() -> str:
    """Periodic safety net (every host's worker runs it): fail lost tasks, put tasks stranded on a
    silent host back in the queue, free reservations whose holder ended, then start what fits."""
    failed = runner.reconcile_host()
    deployment_jobs.sweep()  # lost deployments failed (GPU + port freed), stranded ones requeued, idle stopped
    requeued = scheduler.requeue_stranded()
    orphans = reservations_release_orphans()
    result = scheduler.dispatch()
    return f"lost={failed} requeued={requeued} orphans={orphans} queued={result.tasks} deployed={result.deployments}"

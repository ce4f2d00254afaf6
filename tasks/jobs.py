"""django-q2 entry points. Thin on purpose: each calls one function that holds the logic."""

from __future__ import annotations

from tasks import runner, scheduler


def run_task(task_id: int) -> str:
    """Run one queued task to its end (hours or days)."""
    return runner.run_task(task_id)


def sweep() -> str:
    """Periodic safety net: fail lost tasks, then start whatever fits."""
    failed = runner.reconcile_host()
    queued = scheduler.dispatch_pending()
    return f"lost={failed} queued={queued}"

"""``manage.py worker``: this host's django-q2 cluster, with crash recovery before it starts.

Run one per host (``make worker``). It starts the GPU agent (inventory), reconciles tasks this
host left running (a crash or a restart of the previous worker), makes sure the periodic sweep is
scheduled, dispatches what fits, then runs ``qcluster``.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django_q.models import Schedule

from tasks.runner import reconcile_host
from tasks.scheduler import dispatch_pending


def _stop(agent: subprocess.Popen[bytes]) -> None:
    """Stop the GPU agent and wait for it, so it holds no database connection once we are gone."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.kill()


class Command(BaseCommand):
    help = "Run this host's task worker (django-q2 cluster) after recovering from a crash."

    def handle(self, *args: Any, **options: Any) -> None:
        # The GPU agent runs as its own process (not a thread: django-q2 forks its workers).
        agent = subprocess.Popen([sys.executable, "manage.py", "gpu_agent", "--parent", str(os.getpid())],
                                 cwd=settings.BASE_DIR)
        atexit.register(_stop, agent)
        lost = reconcile_host()
        if lost:
            self.stdout.write(f"Marked {len(lost)} lost task(s) failed: {lost}")
        Schedule.objects.update_or_create(
            name="finetune-sweep",
            defaults={"func": "tasks.jobs.sweep", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )
        dispatch_pending()
        try:
            call_command("qcluster")
        finally:
            _stop(agent)

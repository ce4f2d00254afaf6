"""``manage.py worker``: this host's django-q2 cluster, with crash recovery before it starts.

Run one per host (``make worker``). It starts the GPU agent (inventory), reconciles tasks this
host left running (a crash or a restart of the previous worker), makes sure this host's periodic
sweep is scheduled, dispatches what fits, then runs ``qcluster`` on this host's own queue
(``settings.Q_CLUSTER["cluster_name"]``): the dispatcher enqueues a task on the queue of the host
that holds its GPUs.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django_q.cluster import Cluster
from django_q.conf import Conf
from django_q.models import Schedule

from deployments.runner import reconcile_host as reconcile_deployments
from gpus.inventory import discover
from gpus.services import default_cpu_slots
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
        lost = reconcile_host() + reconcile_deployments()  # deployments' swift groups too
        if lost:
            self.stdout.write(f"Marked {len(lost)} lost task(s)/deployment(s) failed: {lost}")
        # One worker process per GPU and CPU slot (a running task holds one for its whole run),
        # plus room for the sweep and deployments, unless FINETUNE_WORKERS says otherwise.
        if not os.environ.get("FINETUNE_WORKERS"):
            discovery = discover()
            Conf.WORKERS = max(Conf.WORKERS or 2, len(discovery.gpus) + default_cpu_slots(discovery) + 2)
        queue = settings.Q_CLUSTER["cluster_name"]
        # A schedule without a cluster runs only on a cluster named like the prefix; every host
        # has its own queue, so each host gets its own sweep, bound to that queue.
        Schedule.objects.filter(name="finetune-sweep").delete()
        Schedule.objects.update_or_create(
            name=f"finetune-sweep:{settings.FINETUNE_HOST}"[:100],
            defaults={"func": "tasks.jobs.sweep", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1, "cluster": queue},
        )
        self.stdout.write(f"Worker for host {settings.FINETUNE_HOST}: queue {queue}, {Conf.WORKERS} processes")
        dispatch_pending()
        settings.SECRET_KEY  # noqa: B018 - fail here, not in a forked process, if it is missing
        cluster = Cluster()  # handles SIGTERM/SIGINT: stops its workers in order
        try:
            cluster.start()  # returns once the sentinel process runs the cluster
            if cluster.sentinel is not None:
                cluster.sentinel.join()  # until the cluster stops
        finally:
            _stop(agent)

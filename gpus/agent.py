"""The per-host GPU agent: discovers this host's GPUs and refreshes their readings every few
seconds, so the platform knows every GPU on every host (``manage.py gpu_agent``; ``manage.py
worker`` starts one next to the django-q2 cluster)."""

from __future__ import annotations

import logging
import os
import time

from django.conf import settings
from django.db import close_old_connections

from gpus.inventory import discover
from gpus.services import default_cpu_slots, host_announce

logger = logging.getLogger(__name__)


def announce_once() -> bool:
    discovery = discover()
    changed = host_announce(name=settings.FINETUNE_HOST, discovery=discovery, cpu_slots=default_cpu_slots(discovery))
    if changed:
        from tasks.scheduler import dispatch_pending

        dispatch_pending()
    return changed


def run_forever(*, parent_pid: int | None = None) -> None:
    """Refresh until the parent (the worker) goes away."""
    while parent_pid is None or os.getppid() == parent_pid:
        try:
            announce_once()
        except Exception:  # noqa: BLE001 - a database hiccup must not stop the agent
            logger.warning("GPU discovery round failed; retrying", exc_info=True)
            close_old_connections()
        time.sleep(settings.FINETUNE_GPU_REFRESH_SECONDS)

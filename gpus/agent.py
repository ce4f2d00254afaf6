"""The per-host GPU agent: discovers this host's GPUs and refreshes their readings every few
seconds, so the platform knows every GPU on every host (``manage.py gpu_agent``; ``manage.py
worker`` starts one next to the django-q2 cluster, with the worker's instance id)."""

from __future__ import annotations

import logging
import os
import time

from django.conf import settings
from django.db import close_old_connections

from core.live.publish import publish
from gpus.inventory import discover
from gpus.scheduler import INVENTORY_GROUP, dispatch
from gpus.services import HostNameInUse, default_cpu_slots, host_announce

logger = logging.getLogger(__name__)



def announce_once(*, instance: str | None = None) -> bool:
    """One discovery, announced (for the worker ``instance`` that holds the host name, if given)."""
    discovery = discover()
    changed = host_announce(name=settings.FINETUNE_HOST, discovery=discovery, cpu_slots=default_cpu_slots(discovery),
                            instance=instance)
    # Every round: the readings (memory, utilization, temperature) the GPUs page shows move.
    publish(INVENTORY_GROUP, {"host": settings.FINETUNE_HOST, "changed": bool(changed)})
    if changed:
        dispatch()
    return changed


def run_forever(*, parent_pid: int | None = None, instance: str | None = None) -> None:
    """Refresh until the parent (the worker) goes away. A round that finds the host name taken by
    another worker (this one was silent long enough to lose it) writes nothing and says so once."""
    in_use = False
    while parent_pid is None or os.getppid() == parent_pid:
        try:
            announce_once(instance=instance)
            in_use = False
        except HostNameInUse as exc:
            if not in_use:
                logger.error("GPU agent for host %s: not announcing: %s", settings.FINETUNE_HOST, exc)
            in_use = True
        except Exception:  # noqa: BLE001 - a database hiccup must not stop the agent
            logger.warning("GPU discovery round failed; retrying", exc_info=True)
            close_old_connections()
        time.sleep(settings.FINETUNE_GPU_REFRESH_SECONDS)

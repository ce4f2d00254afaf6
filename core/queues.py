"""Names of the django-q2 queues. Every host's worker reads its own queue, so a job lands on the
host whose GPUs the dispatcher reserved (settings and ``tasks.scheduler`` share this rule)."""

from __future__ import annotations

import re


def host_queue(prefix: str, host: str) -> str:
    """The queue (django-q2 cluster name) of ``host``'s worker; fits the broker's 100-character key."""
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', host)}"[:100]

"""A deployment's log in the database: batched lines with contiguous sequence numbers.

The page's live log asks for ``after=<seq>`` and so can always resume exactly where it was. The
deployment's internal API key (swift prints its arguments, key included) is replaced by ``***``
before a line is stored.
"""

from __future__ import annotations

import time
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from deployments.models import Deployment, DeploymentLogLine

PLATFORM_PREFIX = "[platform] "


class DeploymentLog:
    def __init__(self, deployment: Deployment, *, interval: float = 0.2) -> None:
        self.deployment = deployment
        self.interval = interval
        self.secret = ""
        self._lines: list[tuple[str, datetime]] = []
        self._last_flush = 0.0

    def add(self, lines: list[str]) -> None:
        now = timezone.now()
        for line in lines:
            if self.secret and self.secret in line:
                line = line.replace(self.secret, "***")
            self._lines.append((line, now))

    def note(self, message: str) -> None:
        """A line from the platform itself (shown in the live log among swift's lines)."""
        self.add([PLATFORM_PREFIX + message])
        self.flush(force=True)

    def flush(self, *, force: bool = False) -> None:
        if not self._lines or (not force and time.monotonic() - self._last_flush < self.interval):
            return
        self._last_flush = time.monotonic()
        lines, self._lines = self._lines, []
        deployment = self.deployment
        first = deployment.last_log_seq + 1
        rows = [DeploymentLogLine(deployment=deployment, seq=first + i, text=text, created_at=at)
                for i, (text, at) in enumerate(lines)]
        with transaction.atomic():
            DeploymentLogLine.objects.bulk_create(rows)
            Deployment.objects.filter(pk=deployment.pk).update(last_log_seq=rows[-1].seq)
        deployment.last_log_seq = rows[-1].seq

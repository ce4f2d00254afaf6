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

from core.live.publish import publish_many
from deployments.models import Deployment, DeploymentLogLine

PLATFORM_PREFIX = "[platform] "
#: Where the deployment lists hear that a deployment changed (see ``deployments.consumers``).
DEPLOYMENTS_GROUP = "deployments"
#: Lines a notice carries at most; the page reads the rest from the database by sequence number.
MAX_PUBLISHED_LINES = 500


def deployment_group(deployment_id: int) -> str:
    """The group of one deployment's page: its log lines and state changes."""
    return f"deployment.{int(deployment_id)}"


def deployment_changed(deployment: Deployment) -> None:
    """Announce a change of a deployment's state (status, port, counters) to its page and the lists,
    in the caller's transaction: the pages read the state again."""
    publish_many([(deployment_group(deployment.pk), {"deployment": deployment.pk}),
                  (DEPLOYMENTS_GROUP, {"deployment": deployment.pk, "owner": deployment.owner_id})])


class DeploymentLog:
    def __init__(self, deployment: Deployment, *, interval: float = 0.2) -> None:
        self.deployment = deployment
        self.interval = interval
        self.secret = ""
        self._lines: list[tuple[str, datetime]] = []
        self._last_flush = 0.0
        self._unconfirmed = 0  # lines of a write that failed (it may have committed nevertheless)

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
        deployment = self.deployment
        if self._unconfirmed:
            # The last write failed: it may have committed after all (its COMMIT's answer was lost).
            stored = Deployment.objects.filter(pk=deployment.pk).values_list("last_log_seq", flat=True).first() or 0
            if stored >= deployment.last_log_seq + self._unconfirmed:
                del self._lines[:self._unconfirmed]
                deployment.last_log_seq = stored
            self._unconfirmed = 0
            if not self._lines:
                return
        # The lines stay buffered until their write commits: a failed write (the database is away)
        # loses none of them.
        while self._lines:
            lines = self._lines[:5000]
            first = deployment.last_log_seq + 1
            rows = [DeploymentLogLine(deployment=deployment, seq=first + i, text=text, created_at=at)
                    for i, (text, at) in enumerate(lines)]
            self._unconfirmed = len(rows)
            with transaction.atomic():
                DeploymentLogLine.objects.bulk_create(rows)
                Deployment.objects.filter(pk=deployment.pk).update(last_log_seq=rows[-1].seq)
                self._publish(rows)
            self._unconfirmed = 0
            del self._lines[:len(rows)]
            deployment.last_log_seq = rows[-1].seq

    def _publish(self, rows: list[DeploymentLogLine]) -> None:
        """Announce the lines in their write's transaction (the notice exists exactly when they do).
        A platform line comes with a change of status, which the lists show."""
        deployment = self.deployment
        notices = [(deployment_group(deployment.pk), {
            "deployment": deployment.pk, "last_log_seq": rows[-1].seq,
            "lines": [{"seq": r.seq, "text": r.text, "time": r.created_at.isoformat()}
                      for r in rows[:MAX_PUBLISHED_LINES]],
        })]
        if any(r.text.startswith(PLATFORM_PREFIX) for r in rows):
            notices.append((DEPLOYMENTS_GROUP, {"deployment": deployment.pk, "owner": deployment.owner_id}))
        publish_many(notices)

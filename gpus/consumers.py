"""The live GPUs socket (``/ws/gpus/``): shared snapshots of the inventory, on :mod:`core.live`.

The GPUs page (``/gpus/``) renders :func:`gpus.selectors.gpu_overview`; the socket sends the same
payload (``{"type": "gpus", "hosts": [...], "html": {"hosts", "summary"}}``: the host cards
rendered by ``gpus/_host.html``, which the page swaps in). It is a
:class:`~core.live.topics.SharedSnapshot`: computed once per change for every socket of the process (once
per kind of viewer: staff, or one user, and a language, because a holder is named only to its owner
and to staff). A change is announced on :data:`gpus.scheduler.INVENTORY_GROUP` (each agent round,
every booking and release); the snapshot is also re-computed every :data:`POLL_SECONDS` for what
changes with time alone (a host falling silent).

``topics=`` picks among the topics offered by the apps (``gpus`` here, ``queue`` from
``tasks.consumers``: an app above serves its topic through this socket without gpus importing it);
``lang=<code>`` is the page's language. Values that change on every read (seconds since a host was
seen, a task's waited time, seconds until its estimated start) travel with a message but do not
trigger one: the pages tick them locally. ``{"type": "refresh"}`` sends everything again (rate-limited); a
deactivated account is closed with 4401, an anonymous one refused with 4401.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.template.loader import render_to_string
from django.utils.translation import gettext as _

from core.live.topics import SharedSnapshot, TopicConsumer, register_topic
from gpus import selectors
from gpus.scheduler import INVENTORY_GROUP

#: How often the process re-computes the snapshot without a notice (time alone changes it).
POLL_SECONDS = 5.0
TOPICS = ("gpus", "queue")
#: Fields that change on every read; sent along with a real change only.
VOLATILE_FIELDS = frozenset({"last_seen", "seen_seconds_ago", "waited_seconds", "starts_in_seconds", "html"})
#: What the rendered forms carry instead of a CSRF token: the page puts its own in.
CSRF_PLACEHOLDER = "live"


def gpus_message(*, user: Any) -> dict[str, Any]:
    """The GPUs page's payload for ``user``, with its host cards rendered (in the active language)."""
    hosts = selectors.gpu_overview(user=user)
    cards = "".join(
        render_to_string("gpus/_host.html", {"host": host, "user": user, "csrf_token": CSRF_PLACEHOLDER})
        for host in hosts
    )
    gpus = [gpu for host in hosts for gpu in host["gpus"]]
    summary = _("%(free)s of %(total)s GPUs free · %(live)s of %(hosts)s hosts live") % {
        "free": sum(1 for gpu in gpus if gpu["state"] == "free"), "total": len(gpus),
        "live": sum(1 for host in hosts if host["live"]), "hosts": len(hosts),
    }
    return {"type": "gpus", "hosts": hosts, "html": {"hosts": cards, "summary": summary}}


@register_topic
class GpuSnapshot(SharedSnapshot):
    topic = "gpus"
    groups = (INVENTORY_GROUP,)

    @property
    def refresh_seconds(self) -> float:  # type: ignore[override]
        return POLL_SECONDS

    def compute(self, *, user: Any, language: str) -> dict[str, Any]:
        return gpus_message(user=user)


class GpuQueueConsumer(TopicConsumer):
    """Snapshots of the GPUs and the queue for any logged-in user, re-sent when they change."""

    topics = TOPICS
    volatile: ClassVar[frozenset[str]] = VOLATILE_FIELDS

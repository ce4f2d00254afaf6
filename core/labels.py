"""Strings the pages' JavaScript shows, in the page's language, and service errors as one line."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext as _

from core.errors import ServiceValidationError


def live_labels() -> dict[str, Any]:
    """Strings the pages' JavaScript shows, in the page's language."""
    return {
        "connected": _("Live"),
        "connecting": _("Connecting…"),
        "reconnecting": _("Reconnecting…"),
        "too_many": _("Too many pages with live updates are open. Close some tabs; this page will try again."),
        # The same formats as tasks/templatetags/task_format.py uses.
        "durations": {
            "dh": _("%(d)dd %(h)02dh"),
            "hm": _("%(h)dh %(m)02dm"),
            "ms": _("%(m)dm %(s)02ds"),
            "s": _("%(s)ds"),
        },
    }


def service_error_text(exc: ServiceValidationError) -> str:
    parts: list[str] = []
    for message in exc.errors.values():
        if isinstance(message, list):
            parts.extend(str(m) for m in message)
        else:
            parts.append(str(message))
    return "; ".join(parts)

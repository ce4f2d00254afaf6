"""Numbers for humans on the task pages: durations, losses, learning rates (the page's JavaScript
formats live values the same way, in ``static/js/app.js``)."""

from __future__ import annotations

import math
from typing import Any

from django import template
from django.utils.translation import gettext as _

register = template.Library()


def format_duration(seconds: Any) -> str:
    """``3725`` → ``1h 02m``; ``95`` → ``1m 35s``; ``7`` → ``7s``; ``200000`` → ``2d 07h``; none → ``–``."""
    try:
        total = int(round(float(seconds)))
    except (TypeError, ValueError):
        return "–"
    if total < 0 or not math.isfinite(float(seconds)):
        return "–"
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return _("%(d)dd %(h)02dh") % {"d": days, "h": hours}
    if hours:
        return _("%(h)dh %(m)02dm") % {"h": hours, "m": minutes}
    if minutes:
        return _("%(m)dm %(s)02ds") % {"m": minutes, "s": secs}
    return _("%(s)ds") % {"s": secs}


#: How a value swift reported non-finite is shown (by its kind, as stored beside a null; see
#: ``tasks.publisher.NONFINITE_KEY``). ``FTP.fmt.nonfinite`` in static/js/app.js says the same.
NONFINITE_TEXT = {"nan": "NaN", "inf": "∞", "-inf": "−∞"}


def format_significant(value: Any, digits: int = 4, kind: str | None = None) -> str:
    """A float to ``digits`` significant digits (``2.345678`` → ``2.346``, ``1e-4`` → ``0.0001``);
    NaN / ±infinity as ``NaN`` / ``∞`` / ``−∞``, also for a null whose ``kind`` says it was one."""
    if value is None or value == "":
        return NONFINITE_TEXT.get(kind or "", "–")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return NONFINITE_TEXT["nan"]
    if math.isinf(number):
        return NONFINITE_TEXT["inf" if number > 0 else "-inf"]
    return f"{number:.{digits}g}"


@register.filter
def duration(seconds: Any) -> str:
    return format_duration(seconds)


@register.filter
def sig4(value: Any) -> str:
    return format_significant(value, 4)


@register.filter
def task_value(task: Any, name: str) -> str:
    """A task's live number (``loss``, ``learning_rate``, ``epoch``) to 4 significant digits, with
    "NaN" / "∞" where swift reported a non-finite value (stored as null, its kind in ``metrics``)."""
    metrics = getattr(task, "metrics", None)
    marks = metrics.get("nonfinite") if isinstance(metrics, dict) else None
    kind = marks.get(name) if isinstance(marks, dict) else None
    return format_significant(getattr(task, name, None), 4, kind)


@register.filter
def sig3(value: Any) -> str:
    return format_significant(value, 3)


@register.filter
def percent(value: Any) -> str:
    """``37.5`` → ``38%`` (progress bars)."""
    try:
        return f"{float(value):.0f}%"
    except (TypeError, ValueError):
        return "0%"


@register.filter
def gpu_request(gpu_config: Any) -> str:
    """What a task asked for: ``Automatic``, ``CPU``, ``GPU 0,1`` or ``2 × GPU``."""
    if not isinstance(gpu_config, dict) or not gpu_config:
        return _("Automatic")
    if gpu_config.get("cpu"):
        return _("CPU")
    if gpu_config.get("devices"):
        return _("GPU %(devices)s") % {"devices": gpu_config["devices"]}
    if gpu_config.get("count"):
        return _("%(n)s × GPU") % {"n": gpu_config["count"]}
    return _("Automatic")


#: How ``explain_failure`` introduces swift's own words after the plain reason.
_SWIFT_WORDS = ("swift said:", "Last output:")


def split_error(message: Any) -> tuple[str, str]:
    """A task's ``error_message`` as (plain reason, what swift said): the runner writes
    ``"<plain reason>\\nswift said: <last error line>"`` (or ``Last output:``); other messages are
    all reason."""
    lines = str(message or "").splitlines()
    for i, line in enumerate(lines):
        if i and line.startswith(_SWIFT_WORDS):
            return "\n".join(lines[:i]).strip(), "\n".join(lines[i:]).strip()
    return "\n".join(lines).strip(), ""


@register.filter
def error_reason(message: Any) -> str:
    return split_error(message)[0]


@register.filter
def error_detail(message: Any) -> str:
    return split_error(message)[1]

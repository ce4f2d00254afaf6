"""Sizes as the storage quota counts them: decimal units (1 GB = 10⁹ bytes, ``accounts.Quota``),
so a figure and its quota read the same (Django's ``filesizeformat`` counts 1 GB as 2³⁰ bytes)."""

from __future__ import annotations

from django import template
from django.utils.formats import number_format
from django.utils.translation import gettext as _

register = template.Library()

_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))


@register.filter
def decimal_size(value: int | float | None) -> str:
    """``2500000000`` → ``2.50 GB``; ``0`` → ``0 bytes``."""
    size = float(value or 0)
    for factor, unit in _UNITS:
        if size >= factor:
            digits = 2 if size < factor * 10 else 1 if size < factor * 100 else 0
            return f"{number_format(size / factor, digits)}\xa0{unit}"
    return _("%(n)s bytes") % {"n": int(size)}

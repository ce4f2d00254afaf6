"""Storage figures on the task pages (issue 12): sizes in the decimal units the storage quota uses,
and the ``save_total_limit`` a task gets when it sets none."""

from __future__ import annotations

from typing import Any

from django import template

from tasks.command import default_save_total_limit as _default_save_total_limit
from tasks.outputs import human_bytes

register = template.Library()


@register.filter
def storage_size(size: Any) -> str:
    """``1234567890`` → ``1.2 GB``; anything that is not a number → ``–``."""
    if isinstance(size, bool) or not isinstance(size, int):
        return "–"
    return human_bytes(size)


@register.simple_tag
def default_save_total_limit() -> int | None:
    """``FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT``, or None when it leaves swift's default (keep all)."""
    return _default_save_total_limit()

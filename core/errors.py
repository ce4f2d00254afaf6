"""The error services raise for bad input; the API turns it into a 400 that names the field."""

from __future__ import annotations

from typing import Any


class ServiceValidationError(Exception):
    """Invalid input to a service. ``errors`` maps a field name to a message, a list of messages,
    or (for JSON fields such as ``training_args``) a nested mapping of key → message."""

    def __init__(self, errors: dict[str, Any]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in errors.items()))


class QuotaExceeded(ServiceValidationError):
    """A request over one of the user's quotas (``accounts.Quota``). The API answers 403 with
    ``{"detail", "quota", "limit", "used"}``; pages show ``detail`` like any other refusal.

    ``quota`` is the limit's name as staff see it in admin (``max_waiting_tasks``, ``max_gpus``,
    ``gpu_hours_per_week``, ``max_deployments``, ``max_storage_gb``)."""

    def __init__(self, *, quota: str, limit: float, used: float, detail: str):
        self.quota, self.limit, self.used, self.detail = quota, limit, used, detail
        super().__init__({"quota": detail})

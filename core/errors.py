"""The error services raise for bad input; the API turns it into a 400 that names the field."""

from __future__ import annotations

from typing import Any


class ServiceValidationError(Exception):
    """Invalid input to a service. ``errors`` maps a field name to a message, a list of messages,
    or (for JSON fields such as ``training_args``) a nested mapping of key → message."""

    def __init__(self, errors: dict[str, Any]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in errors.items()))

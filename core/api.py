"""API-wide conventions: errors always name the field, never a bare 500 for bad input."""

from __future__ import annotations

from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from core.errors import ServiceValidationError


def _as_lists(errors: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in errors.items():
        if isinstance(value, dict):
            out[field] = _as_lists(value)
        elif isinstance(value, (list, tuple)):
            out[field] = [str(v) for v in value]
        else:
            out[field] = [str(value)]
    return out


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ServiceValidationError):
        return Response(_as_lists(exc.errors), status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)

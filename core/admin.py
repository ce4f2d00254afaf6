"""Admin helpers shared by every app."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest


class OwnedAdminMixin:
    """Staff see all rows; anyone else with admin access sees only their own (404 otherwise)."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        qs = super().get_queryset(request)  # type: ignore[misc]
        return qs.model.objects.for_user(request.user) if hasattr(qs.model.objects, "for_user") else qs

"""The one place ownership is decided.

Every owned model uses :class:`OwnedQuerySet`; selectors, API ``get_queryset()``, page views, admin
and WebSocket consumers all start from ``Model.objects.for_user(user)``. An object outside that
queryset does not exist for the user: the answer is 404, never 403.
"""

from __future__ import annotations

from typing import Any, Self

from django.db import models


class OwnedQuerySet(models.QuerySet):
    owner_field = "owner"

    def for_user(self, user: Any) -> Self:
        if user is None or not getattr(user, "is_authenticated", False):
            return self.none()
        if user.is_staff:
            return self
        return self.filter(**{self.owner_field: user})

"""The admin's read-only "Usage by user" report: every user with their GPU-hours (this week, this
month, the last 7 days), CPU-slot hours, runs, storage and reached quotas.

The figures of a changelist page are computed once for the page's users
(:func:`usage.selectors.user_usage_rows`, a constant number of queries), not one query per row.
Nothing here changes anything: no add, change or delete. Every staff user may read it, as on
``/usage/all/``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from usage.models import UserUsage
from usage.selectors import UsageFigures, user_usage_rows
from usage.templatetags.usage_format import decimal_size


def _hours(value: float) -> str:
    return f"{value:.1f}"


@admin.register(UserUsage)
class UserUsageAdmin(admin.ModelAdmin):
    list_display = [
        "username", "gpu_hours_week", "gpu_hours_month", "gpu_hours_rolling_7d", "cpu_slot_hours_month",
        "training_runs_month", "deployment_runs_month", "storage", "quotas_reached",
    ]
    list_display_links = None
    list_filter = ["is_staff", "is_active"]
    search_fields = ["username", "email"]
    readonly_fields = ["username"]
    list_select_related: list[str] = []
    ordering = ["username"]
    list_per_page = 50
    actions = None

    # --- read-only, for every staff user ---------------------------------------------------------
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # --- the page's figures, in bulk --------------------------------------------------------------
    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        users = list(changelist.result_list)
        figures = {row.user_id: row for row in user_usage_rows(user_ids=[user.pk for user in users])}
        for user in users:
            user.usage_figures = figures.get(user.pk)
        changelist.result_list = users
        return changelist

    @staticmethod
    def _figures(obj: Any) -> UsageFigures | None:
        return getattr(obj, "usage_figures", None)

    @admin.display(description=_("GPU-hours this week"))
    def gpu_hours_week(self, obj: Any) -> str:
        figures = self._figures(obj)
        return _hours(figures.week.gpu_hours) if figures else "–"

    @admin.display(description=_("GPU-hours this month"))
    def gpu_hours_month(self, obj: Any) -> str:
        figures = self._figures(obj)
        return _hours(figures.month.gpu_hours) if figures else "–"

    @admin.display(description=_("GPU-hours, last 7 days"))
    def gpu_hours_rolling_7d(self, obj: Any) -> str:
        figures = self._figures(obj)
        return _hours(figures.rolling_7d.gpu_hours) if figures else "–"

    @admin.display(description=_("CPU-slot hours this month"))
    def cpu_slot_hours_month(self, obj: Any) -> str:
        figures = self._figures(obj)
        return _hours(figures.month.cpu_slot_hours) if figures else "–"

    @admin.display(description=_("training runs this month"))
    def training_runs_month(self, obj: Any) -> int | str:
        figures = self._figures(obj)
        return figures.month.training_runs if figures else "–"

    @admin.display(description=_("deployments this month"))
    def deployment_runs_month(self, obj: Any) -> int | str:
        figures = self._figures(obj)
        return figures.month.deployment_runs if figures else "–"

    @admin.display(description=_("storage"))
    def storage(self, obj: Any) -> str:
        figures = self._figures(obj)
        return decimal_size(figures.storage_bytes) if figures else "–"

    @admin.display(description=_("quotas reached"))
    def quotas_reached(self, obj: Any) -> str:
        figures = self._figures(obj)
        if figures is None:
            return "–"
        return ", ".join(str(quota.label) for quota in figures.quotas_reached) or "–"

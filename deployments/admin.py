"""Operators see and stop every deployment here; actions call the same services as the API."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from core.admin import OwnedAdminMixin
from deployments import services
from deployments.models import Deployment, DeploymentLogLine

RUNTIME_FIELDS = [
    "status", "host", "port", "pid", "process_started", "runner_pid", "heartbeat_at", "command", "log_file_path",
    "last_log_seq", "exit_code", "error_message", "stop_reason", "request_count", "prompt_tokens",
    "completion_tokens", "last_request_at", "created_at", "started_at", "ready_at", "stopped_at",
    "stop_requested_at", "delete_requested_at",
]


@admin.register(Deployment)
class DeploymentAdmin(OwnedAdminMixin, admin.ModelAdmin):
    list_display = ["id", "name", "owner", "status", "source", "backend", "host", "port", "request_count",
                    "created_at", "stopped_at"]
    list_filter = ["status", "backend", "source", "host", "owner"]
    search_fields = ["name", "served_model_name", "model_path", "owner__username"]
    list_select_related = ["owner", "task"]
    # What a deployment serves was validated by the service; the internal API key is never shown.
    readonly_fields = ["owner", "source", "task", "model_path", "base_model", "backend", "deploy_args",
                       "served_model_name", "gpu_config", "memory_estimate_gb", *RUNTIME_FIELDS]
    exclude = ["api_key"]
    actions = ["stop_deployments", "delete_deployments"]
    fieldsets = [
        (None, {"fields": ["name", "owner", "source", "task", "model_path", "base_model", "backend",
                           "served_model_name", "deploy_args", "gpu_config", "memory_estimate_gb"]}),
        (_("Runtime"), {"fields": RUNTIME_FIELDS}),
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # created through the validating service (API, pages)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a raw delete would skip stopping the process
        return actions

    def delete_model(self, request: HttpRequest, obj: Deployment) -> None:
        services.deployment_delete(deployment=obj)

    @admin.action(description=_("Stop selected deployments"))
    def stop_deployments(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        count = 0
        for deployment in queryset:
            services.deployment_stop(deployment=deployment, reason="Stopped by an operator")
            count += 1
        messages.success(request, _("Asked %(n)d deployment(s) to stop.") % {"n": count})

    @admin.action(description=_("Delete selected deployments (stop first)"))
    def delete_deployments(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        count = 0
        for deployment in list(queryset):
            services.deployment_delete(deployment=deployment)
            count += 1
        messages.success(request, _("Deleted %(n)d deployment(s).") % {"n": count})


@admin.register(DeploymentLogLine)
class DeploymentLogLineAdmin(admin.ModelAdmin):
    list_display = ["deployment", "seq", "text", "created_at"]
    list_filter = ["deployment__status"]
    search_fields = ["text", "deployment__name"]
    list_select_related = ["deployment"]
    readonly_fields = ["deployment", "seq", "text", "created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeploymentLogLine]:
        qs = super().get_queryset(request)
        return qs.filter(deployment__in=Deployment.objects.for_user(request.user))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

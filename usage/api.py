"""``/api/usage/``: the caller's usage report; ``/api/usage/users/``: every user's, for staff.

Both read :mod:`usage.selectors` (the same reports as the ``/usage/`` pages). Hours are decimal
hours; ``*_seconds`` are seconds. The windows are labelled in every answer: ``week`` is the
calendar week (from Monday 00:00, server time zone), ``month`` the calendar month, ``rolling_7d``
the last 7 days up to now (what the ``gpu_hours_per_week`` quota counts).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import json_field
from usage.selectors import usage_report, usage_staff_report


class UsageWindowSerializer(serializers.Serializer):
    since = serializers.DateTimeField(help_text="Start of the window (inclusive).")
    until = serializers.DateTimeField(help_text="End of the window: now.")
    gpu_seconds = serializers.FloatField()
    gpu_hours = serializers.FloatField()
    gpu_hours_by_model = json_field(
        {"type": "object", "additionalProperties": {"type": "number"}},
        help_text="GPU-hours per GPU model (as the workers report the model's name).",
    )
    cpu_slot_seconds = serializers.FloatField()
    cpu_slot_hours = serializers.FloatField()
    training_runs = serializers.IntegerField(help_text="Training runs that ran in the window (a resume is a run).")
    export_runs = serializers.IntegerField()
    deployment_runs = serializers.IntegerField()


class UsageDaySerializer(serializers.Serializer):
    day = serializers.DateField(help_text="A calendar day in the server's time zone.")
    gpu_hours = serializers.SerializerMethodField()
    cpu_slot_hours = serializers.SerializerMethodField()

    def get_gpu_hours(self, day: Any) -> float:
        return day.gpu_seconds / 3600

    def get_cpu_slot_hours(self, day: Any) -> float:
        return day.cpu_slot_seconds / 3600


class UsageGpuModelSerializer(serializers.Serializer):
    model = serializers.CharField()
    gpu_hours_week = serializers.FloatField()
    gpu_hours_month = serializers.FloatField()
    gpu_hours_rolling_7d = serializers.FloatField()


class UsageQuotaSerializer(serializers.Serializer):
    limit = serializers.FloatField(allow_null=True, help_text="The limit in ``unit``; null: no limit.")
    used = serializers.FloatField(help_text="What counts against it now, in ``unit``.")
    unit = serializers.CharField()
    percent = serializers.FloatField(allow_null=True, help_text="``used`` / ``limit`` × 100; null without a limit.")
    reached = serializers.BooleanField(help_text="Used up: a new request of this kind is refused or waits.")


class UsageQuotasSerializer(serializers.Serializer):
    """One key per quota: ``accounts.Quota``'s field names, as a ``QuotaExceeded`` refusal names them."""

    max_waiting_tasks = UsageQuotaSerializer(help_text="Tasks not started yet (waiting or handed to a worker).")
    max_gpus = UsageQuotaSerializer(help_text="GPUs held now by running tasks, exports and deployments.")
    gpu_hours_per_week = UsageQuotaSerializer(help_text="GPU-hours in the rolling last 7 days.")
    max_deployments = UsageQuotaSerializer(help_text="Deployments waiting, starting or serving.")
    max_storage_gb = UsageQuotaSerializer(help_text="Datasets and task outputs, in GB (10⁹ bytes).")


class UsageReportSerializer(serializers.Serializer):
    username = serializers.CharField(source="figures.username")
    week = UsageWindowSerializer(help_text="The calendar week: from Monday 00:00 (server time zone) to now.")
    month = UsageWindowSerializer(help_text="The calendar month: from the 1st, 00:00, to now.")
    rolling_7d = UsageWindowSerializer(help_text="The last 7 days up to now: what the GPU-hour quota counts.")
    daily = UsageDaySerializer(many=True, help_text="The last 30 days, oldest first, every day listed.")
    gpu_models = UsageGpuModelSerializer(many=True)
    storage_bytes = serializers.IntegerField(help_text="Uploaded datasets and task outputs, as last measured.")
    gpus_held = serializers.IntegerField(source="figures.gpus_held")
    running_deployments = serializers.IntegerField(source="figures.running_deployments")
    waiting_tasks = serializers.IntegerField(source="figures.waiting_tasks")
    quotas = UsageQuotasSerializer(source="figures.quota_map")


class UsageUserSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="user_id")
    username = serializers.CharField()
    is_staff = serializers.BooleanField()
    gpu_hours_week = serializers.FloatField(source="week.gpu_hours")
    gpu_hours_month = serializers.FloatField(source="month.gpu_hours")
    gpu_hours_rolling_7d = serializers.FloatField(source="rolling_7d.gpu_hours")
    cpu_slot_hours_month = serializers.FloatField(source="month.cpu_slot_hours")
    training_runs_month = serializers.IntegerField(source="month.training_runs")
    deployment_runs_month = serializers.IntegerField(source="month.deployment_runs")
    storage_bytes = serializers.IntegerField()
    gpus_held = serializers.IntegerField()
    running_deployments = serializers.IntegerField()
    waiting_tasks = serializers.IntegerField()
    quotas = UsageQuotasSerializer(source="quota_map")
    quotas_reached = serializers.SerializerMethodField()

    def get_quotas_reached(self, row: Any) -> list[str]:
        return [quota.name for quota in row.quotas_reached]


class UsageOutputSerializer(serializers.Serializer):
    task = serializers.IntegerField(source="pk")
    name = serializers.CharField()
    owner = serializers.CharField(source="owner.username")
    status = serializers.CharField()
    output_bytes = serializers.IntegerField()
    output_measured_at = serializers.DateTimeField(allow_null=True)


class UsagePeriodsSerializer(serializers.Serializer):
    now = serializers.DateTimeField()
    week_since = serializers.DateTimeField(help_text="Monday 00:00 (server time zone).")
    month_since = serializers.DateTimeField(help_text="The 1st, 00:00.")
    rolling_since = serializers.DateTimeField(help_text="Now − 7 days.")


class UsageStaffReportSerializer(serializers.Serializer):
    periods = UsagePeriodsSerializer()
    results = UsageUserSerializer(
        many=True, source="rows",
        help_text="Every user who used GPUs or CPU slots this month or in the last 7 days, holds something "
                  "now or stores something; by GPU-hours this month, largest first.",
    )
    daily = UsageDaySerializer(many=True, help_text="All users together, the last 30 days, oldest first.")
    gpu_models = UsageGpuModelSerializer(many=True, help_text="All users together.")
    largest_outputs = UsageOutputSerializer(many=True, help_text="The 50 tasks whose folders use the most disk.")


class IsStaff(permissions.BasePermission):
    message = "Only operators (staff) can see every user's usage."

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_staff)


class UsageView(APIView):
    """The caller's usage: this calendar week, this calendar month, the rolling last 7 days (what
    the GPU-hour quota counts), the last 30 days day by day, GPU-hours per GPU model, storage, and
    each quota with its limit and current usage."""

    @extend_schema(responses={200: UsageReportSerializer}, operation_id="usage_retrieve")
    def get(self, request: Request) -> Response:
        return Response(UsageReportSerializer(usage_report(user=request.user)).data)


class UsageUsersView(APIView):
    """Staff only: every user's usage (GPU-hours this week, this month and in the last 7 days,
    CPU-slot hours, runs, storage, quotas), all users' daily series and the largest task outputs."""

    permission_classes = [permissions.IsAuthenticated, IsStaff]

    @extend_schema(responses={200: UsageStaffReportSerializer}, operation_id="usage_users_retrieve")
    def get(self, request: Request) -> Response:
        return Response(UsageStaffReportSerializer(usage_staff_report()).data)

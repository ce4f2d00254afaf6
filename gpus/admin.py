from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from gpus import services
from gpus.models import Gpu, Host, Reservation, Run
from gpus.scheduler import dispatch_on_commit
from gpus.supervisor import runs_release_lost


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0
    can_delete = False
    fields = ["index", "name", "uuid", "memory_total_mb", "memory_used_mb", "utilization_pct", "enabled", "present"]
    readonly_fields = ["index", "name", "uuid", "memory_total_mb", "memory_used_mb", "utilization_pct", "present"]


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "gpu_backend", "cpu_slots", "enabled", "last_seen_at", "agent_machine",
                    "gpu_error"]
    list_filter = ["enabled", "gpu_backend"]
    search_fields = ["name", "address", "agent_machine"]
    readonly_fields = ["name", "address", "gpu_backend", "gpu_error", "cpu_slots", "last_seen_at", "agent_instance",
                       "agent_pid",
                       "agent_machine", "agent_boot", "agent_started_at", "created_at"]
    inlines = [GpuInline]
    actions = ["release_lost"]

    @admin.action(description="Release the GPUs of lost runs (the host is gone for good)")
    def release_lost(self, request: HttpRequest, queryset: QuerySet[Host]) -> None:
        released = sum(runs_release_lost(host=host) for host in queryset)
        messages.success(request, f"Released {released} lost run(s); their GPUs and CPU slots are free.")

    def save_model(self, request: HttpRequest, obj: Host, form: Any, change: bool) -> None:
        if change:
            # Only what the form changed: the agent (last_seen_at) and a starting worker (its claim)
            # write this row concurrently, and a full save would put back the values read before.
            obj.save(update_fields=form.changed_data)
        else:
            super().save_model(request, obj, form, change)
        if obj.enabled and "enabled" in form.changed_data:
            dispatch_on_commit()  # the host's capacity is back


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = [
        "host",
        "index",
        "name",
        "memory_used_mb",
        "memory_total_mb",
        "utilization_pct",
        "enabled",
        "present",
    ]
    list_filter = ["enabled", "present", "host"]
    search_fields = ["uuid", "name", "host__name"]
    readonly_fields = [
        "host",
        "index",
        "uuid",
        "name",
        "memory_total_mb",
        "memory_used_mb",
        "utilization_pct",
        "temperature_c",
        "processes",
        "present",
        "updated_at",
    ]
    list_select_related = ["host"]
    actions = ["enable", "drain"]

    @admin.action(description="Enable selected GPUs")
    def enable(self, request: HttpRequest, queryset: QuerySet[Gpu]) -> None:
        for gpu in queryset:
            services.gpu_set_enabled(gpu=gpu, enabled=True)
        messages.success(request, f"Enabled {queryset.count()} GPU(s).")

    @admin.action(description="Drain selected GPUs (no new tasks; running ones finish)")
    def drain(self, request: HttpRequest, queryset: QuerySet[Gpu]) -> None:
        for gpu in queryset:
            services.gpu_set_enabled(gpu=gpu, enabled=False)
        messages.success(request, f"Draining {queryset.count()} GPU(s).")


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    list_display = ["host", "gpu", "cpu_slot", "run", "created_at"]
    list_filter = ["host"]
    search_fields = ["run__label", "gpu__uuid"]
    readonly_fields = ["host", "gpu", "cpu_slot", "run", "created_at"]
    list_select_related = ["host", "gpu", "run"]


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Every supervised process (training runs, exports, deployments). Staff only: runs are changed by
    the supervisor and the services, never by hand."""

    list_display = ["id", "kind", "label", "owner", "status", "host", "pid", "heartbeat_at", "created_at"]
    list_filter = ["kind", "status", "host"]
    search_fields = ["label", "owner__username", "host"]
    list_select_related = ["owner"]
    readonly_fields = [f.name for f in Run._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_staff and request.user.is_superuser)

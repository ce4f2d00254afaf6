"""Operators see and steer everything here; non-staff admin users see only their own objects.
Actions call the same services as the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from core.admin import OwnedAdminMixin
from core.errors import ServiceValidationError
from gpus.services import run_set_queue_fields
from tasks import services, storage
from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskExport, TaskLogLine, TaskMetric
from tasks.outputs import human_bytes


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    extra = 0
    can_delete = False
    fields = ["created_at", "kind", "message"]
    readonly_fields = fields
    ordering = ["created_at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


RUNTIME_FIELDS = [
    "status", "progress", "current_step", "max_steps", "epoch", "loss", "learning_rate", "eta_seconds",
    "model_source", "model_path", "output_path", "log_file_path", "command", "host", "pid", "process_started",
    "runner_pid", "heartbeat_at", "exit_code", "error_message", "last_checkpoint", "metrics", "last_log_seq",
    "run_number", "resume_from", "run_dir",
    "created_at", "queued_at", "started_at", "finished_at", "stop_requested_at", "delete_requested_at",
]


STORAGE_FIELDS = ["output_bytes", "output_measured_at", "outputs_deleted_at"]


class StorageFilter(admin.SimpleListFilter):
    """Find the tasks that fill the disk (sort by the Storage column for the largest first)."""

    title = "storage"
    parameter_name = "storage"
    _AT_LEAST = {"1gb": 10**9, "10gb": 10 * 10**9, "100gb": 100 * 10**9}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("1gb", "1 GB or more"), ("10gb", "10 GB or more"), ("100gb", "100 GB or more"),
                ("deleted", "Outputs deleted")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> QuerySet[FinetuningTask]:
        value = self.value()
        if value == "deleted":
            return queryset.filter(outputs_deleted_at__isnull=False)
        if value in self._AT_LEAST:
            return queryset.filter(output_bytes__gte=self._AT_LEAST[value])
        return queryset


@admin.register(FinetuningTask)
class FinetuningTaskAdmin(OwnedAdminMixin, admin.ModelAdmin):
    list_display = ["id", "name", "owner", "task_type", "train_type", "status", "progress", "priority",
                    "host", "storage", "created_at", "finished_at"]
    list_filter = ["status", "task_type", "train_type", StorageFilter, "run__host", "owner"]
    search_fields = ["name", "description", "base_model", "owner__username"]
    # A task's definition was validated by the service when it was created; editing it here would
    # bypass that validation (and the resolved model path would no longer match), so only the name,
    # description and priority stay editable.
    readonly_fields = [
        "owner", "task_type", "train_type", "preset", "base_model", "datasets", "training_args", "gpu_config",
        "output_name", "held", "master_port", "memory_estimate_gb", "auto_export", *RUNTIME_FIELDS,
        *STORAGE_FIELDS,
    ]
    list_select_related = ["owner", "run"]
    inlines = [TaskEventInline]
    actions = ["stop_tasks", "delete_tasks", "hold_tasks", "release_tasks", "raise_priority", "lower_priority",
               "resume_tasks", "export_tasks", "delete_outputs"]
    fieldsets = [
        (None, {"fields": ["name", "description", "owner", "task_type", "train_type", "preset", "priority"]}),
        ("What it trains", {"fields": ["base_model", "datasets", "training_args", "gpu_config", "output_name",
                                       "auto_export"]}),
        ("Scheduling", {"fields": ["held", "memory_estimate_gb", "master_port"]}),
        ("Runtime", {"fields": RUNTIME_FIELDS}),
        ("Storage", {"fields": STORAGE_FIELDS}),
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Creating goes through the validating service (API, seed calls, pages), not a raw form.
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a raw delete would skip stopping the process
        return actions

    def delete_model(self, request: HttpRequest, obj: FinetuningTask) -> None:
        services.finetuning_task_delete(task=obj)

    def save_model(self, request: HttpRequest, obj: FinetuningTask, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "priority" in form.changed_data:
            # The scheduler reads the run's priority; a waiting task may now come first.
            run_set_queue_fields(run_id=obj.run_id, priority=obj.priority)

    @admin.action(description="Hold selected waiting tasks (keep their place, do not start)")
    def hold_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, services.finetuning_task_hold, "Held {n} task(s).")

    @admin.action(description="Release selected held tasks")
    def release_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, services.finetuning_task_release, "Released {n} task(s).")

    @admin.action(description="Raise priority of selected waiting tasks by 1")
    def raise_priority(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, lambda *, task: services.finetuning_task_set_priority(
            task=task, priority=min(10, task.priority + 1), by=request.user), "Raised the priority of {n} task(s).")

    @admin.action(description="Lower priority of selected waiting tasks by 1")
    def lower_priority(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, lambda *, task: services.finetuning_task_set_priority(
            task=task, priority=max(0, task.priority - 1), by=request.user), "Lowered the priority of {n} task(s).")

    def _each(
        self, request: HttpRequest, queryset: QuerySet[FinetuningTask], act: Callable[..., Any], done: str
    ) -> None:
        """Apply a service to each selected task; a task it refuses is reported, not fatal."""
        count = 0
        for task in list(queryset):
            try:
                act(task=task)
                count += 1
            except ServiceValidationError as exc:
                messages.warning(request, f"#{task.pk} {task.name}: {exc}")
        messages.success(request, done.format(n=count))

    @admin.action(description="Resume selected stopped or failed tasks from their last checkpoint")
    def resume_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, services.finetuning_task_resume, "Resumed {n} task(s).")

    @admin.action(description="Export (merge LoRA) the last checkpoint of selected tasks")
    def export_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, services.task_export_create, "Queued {n} export(s).")

    @admin.display(description="Storage", ordering="output_bytes")
    def storage(self, obj: FinetuningTask) -> str:
        """The task folder's measured size (checkpoints, merged models, logs); sortable."""
        return human_bytes(obj.output_bytes)

    @admin.action(description="Delete outputs of selected tasks (checkpoints and merged models; keeps the records)")
    def delete_outputs(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        self._each(request, queryset, storage.task_outputs_delete, "Deleted the outputs of {n} task(s).")

    @admin.action(description="Stop selected tasks")
    def stop_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        for task in queryset:
            services.finetuning_task_stop(task=task)
        messages.success(request, f"Asked {queryset.count()} task(s) to stop.")

    @admin.action(description="Delete selected tasks (stop first, keep model output)")
    def delete_tasks(self, request: HttpRequest, queryset: QuerySet[FinetuningTask]) -> None:
        count = 0
        for task in list(queryset):
            services.finetuning_task_delete(task=task)
            count += 1
        messages.success(request, f"Deleted {count} task(s); model outputs were kept on disk.")


@admin.register(Dataset)
class DatasetAdmin(OwnedAdminMixin, admin.ModelAdmin):
    list_display = ["id", "name", "owner", "format", "rows", "size_bytes", "created_at"]
    list_filter = ["format", "file_type", "owner"]
    search_fields = ["name", "original_filename", "owner__username"]
    readonly_fields = ["owner", "original_filename", "path", "file_type", "format", "rows", "size_bytes",
                       "columns", "created_at"]
    list_select_related = ["owner"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # uploads are validated by the service (API or pages)

    def delete_model(self, request: HttpRequest, obj: Dataset) -> None:
        services.dataset_delete(dataset=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Dataset]) -> None:
        for dataset in queryset:
            services.dataset_delete(dataset=dataset)


class TaskChildAdmin(admin.ModelAdmin):
    """Read-only views of a run's records, scoped like their task."""

    list_select_related = ["task", "task__owner"]
    search_fields = ["task__name", "task__owner__username"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        qs = super().get_queryset(request)
        visible = FinetuningTask.objects.for_user(request.user)
        return qs.filter(task__in=visible)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TaskLogLine)
class TaskLogLineAdmin(TaskChildAdmin):
    list_display = ["task", "seq", "created_at", "text"]
    list_filter = ["task__status", "task__owner"]
    search_fields = [*TaskChildAdmin.search_fields, "text"]
    readonly_fields = ["task", "seq", "text", "created_at"]


@admin.register(TaskMetric)
class TaskMetricAdmin(TaskChildAdmin):
    list_display = ["task", "kind", "step", "epoch", "loss", "learning_rate", "grad_norm"]
    list_filter = ["kind", "task__task_type", "task__owner"]
    readonly_fields = ["task", "kind", "step", "epoch", "loss", "learning_rate", "grad_norm", "token_acc",
                       "memory_gib", "seconds_per_step", "values", "created_at"]


@admin.register(TaskEvent)
class TaskEventAdmin(TaskChildAdmin):
    list_display = ["task", "kind", "message", "created_at"]
    list_filter = ["kind", "task__owner"]
    readonly_fields = ["task", "kind", "message", "data", "created_at"]


@admin.register(TaskExport)
class TaskExportAdmin(TaskChildAdmin):
    """Merges of checkpoints into full models. Created from the API, the task page or the task
    admin's "Export" action (the same service); stopped with the action below."""

    list_display = ["id", "task", "checkpoint_name", "status", "host", "size_bytes", "created_at", "finished_at"]
    list_filter = ["status", "task__owner"]
    search_fields = [*TaskChildAdmin.search_fields, "checkpoint", "output_path"]
    readonly_fields = ["task", "checkpoint", "step", "status", "output_path", "size_bytes", "command", "host", "pid",
                       "process_started", "runner_pid", "exit_code", "error_message", "log_file_path", "log_text",
                       "created_at", "started_at", "finished_at", "stop_requested_at"]
    actions = ["stop_exports"]

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a raw delete would orphan a running merge
        return actions

    @admin.action(description="Stop selected exports")
    def stop_exports(self, request: HttpRequest, queryset: QuerySet[TaskExport]) -> None:
        count = 0
        for export in queryset.filter(status__in=["pending", "running"]):
            services.task_export_stop(export=export)
            count += 1
        messages.success(request, f"Asked {count} export(s) to stop.")

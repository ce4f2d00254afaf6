from __future__ import annotations

import math
from typing import Any

from django.db import models
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.api import JsonSerializer, described_field, json_field
from core.query import QuerySerializer
from gpus.models import RUN_HOLDING_STATUSES
from gpus.selectors import run_gpu_memory_usage
from tasks.models import (
    Dataset,
    FinetuningTask,
    TaskEvent,
    TaskExport,
    TaskLogLine,
    TaskMetric,
    TaskType,
    TrainType,
)
from tasks.presets import all_presets

#: GPUs by index or UUID, comma-separated ("" names none).
_GPU = r"(?:\d{1,3}|GPU-[0-9a-fA-F-]{8,64})"
_DEVICES = {"type": "string", "pattern": f"^(?:{_GPU}(?:,{_GPU})*)?$"}
#: ``gpu_config`` of a task or a deployment, as ``normalize_gpu_config`` reads it. (Which keys go
#: together is said in words: devices or count, not both; cpu with neither.)
GPU_CONFIG_SCHEMA = {
    "type": "object",
    "description": 'Where it runs: {"count": N} GPUs, {"devices": "0,1"} (indices or UUIDs) or {"cpu": true}; '
                   "optionally min_memory_gb per GPU. Empty or left out: the default.",
    "properties": {
        "devices": {"anyOf": [{**_DEVICES, "nullable": True}, {"type": "integer", "minimum": 0, "maximum": 999},
                              {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}],
                    "description": 'GPU indices or UUIDs: "0,1", 0 or ["0", "1"]; null or "": none named.'},
        # Read only when devices is absent (then like devices), in this order.
        "cuda_visible_devices": {"description": "The seed's spelling of devices."},
        "gpu_id": {"description": "The seed's spelling of devices."},
        "gpu_ids": {"description": "The seed's spelling of devices."},
        "count": {"type": "integer", "minimum": 1, "maximum": 64},
        "cpu": {"type": "boolean", "nullable": True},
        "min_memory_gb": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 4096,
                          "nullable": True},
    },
    "additionalProperties": False,
}
#: A preset's name ("" or left out: none). The service names the presets in its refusal.
PRESET_SCHEMA = {"type": "string", "enum": [*(p.name for p in all_presets()), ""],
                 "description": "A preset's name (GET /api/finetuning/presets/); empty or left out: none."}
def gpu_config_cpu_is_boolean(value: Any) -> None:
    """``cpu`` is true, false or null, as the schema says (the service would read 0 as false)."""
    if isinstance(value, dict) and value.get("cpu") is not None and not isinstance(value["cpu"], bool):
        raise serializers.ValidationError("cpu must be true or false")


#: What ``datasets`` names: an uploaded dataset's id, a hub dataset id or a built-in dataset.
_DATASET_REF = {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1}]}
_DATASETS_SCHEMA = {
    "anyOf": [_DATASET_REF["anyOf"][0], _DATASET_REF["anyOf"][1],
              {"type": "array", "items": _DATASET_REF, "minItems": 1, "maxItems": 32}],
    "description": 'Uploaded dataset ids and/or hub dataset ids ("owner/name", optionally "#N" samples) or '
                   '"builtin:<name>": one, or a list of up to 32.',
}
_TRAINING_ARGS_SCHEMA = {
    "type": "object",
    "description": "Allow-listed swift training arguments, name → value: GET /api/finetuning/training-args/ lists "
                   "them with their types and ranges.",
    "additionalProperties": True,
}


_NOT_BLANK = {"type": "string", "pattern": r"\S"}


class TaskCreateSerializer(JsonSerializer):
    """Create a task from scratch (``name``, ``base_model`` and ``datasets`` required), or from a
    preset (then only ``preset`` is required)."""

    #: Either a preset or the three fields a task needs (``core.api.AutoSchema`` writes it as anyOf).
    schema_any_of = [
        {"required": ["preset"], "properties": {"preset": _NOT_BLANK}},
        {"required": ["name", "base_model", "datasets"],
         "properties": {"name": _NOT_BLANK, "base_model": _NOT_BLANK, "datasets": _DATASETS_SCHEMA,
                        "training_args": _TRAINING_ARGS_SCHEMA}},
    ]

    preset = described_field(serializers.CharField, PRESET_SCHEMA, required=False, allow_blank=True, max_length=64)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    task_type = serializers.ChoiceField(choices=TaskType.choices, default=TaskType.SFT)
    train_type = serializers.ChoiceField(choices=TrainType.choices, default=TrainType.LORA)
    base_model = serializers.CharField(required=False, allow_blank=True, max_length=1000,
                                       help_text="A hub model id (owner/name) or a model folder under a model root.")
    # Their shapes are in schema_any_of's second branch: with a preset, they are not read.
    datasets = json_field({"description": _DATASETS_SCHEMA["description"]}, required=False, allow_null=True)
    training_args = json_field({"description": _TRAINING_ARGS_SCHEMA["description"] + " null: none."},
                               required=False, allow_null=True)
    gpu_config = json_field(GPU_CONFIG_SCHEMA, required=False, validators=[gpu_config_cpu_is_boolean])
    priority = serializers.IntegerField(
        required=False, min_value=0, max_value=10,
        help_text="0-10, larger runs first (default 5); above FINETUNE_USER_MAX_PRIORITY (5 by default): staff only.",
    )
    output_name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    auto_export = serializers.BooleanField(
        required=False, default=False,
        help_text="When the task completes, merge its last checkpoint into a full model (LoRA/QLoRA only).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("preset"):
            return attrs
        errors = {}
        if not (attrs.get("name") or "").strip():
            errors["name"] = ["This field is required."]
        if not (attrs.get("base_model") or "").strip():
            errors["base_model"] = ["This field is required (a hub id or a local model folder)."]
        if attrs.get("datasets") in (None, "", []):
            errors["datasets"] = ["This field is required (uploaded dataset ids and/or hub dataset ids)."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


@extend_schema_field({"type": "number", "format": "double", "nullable": True})
class FiniteFloatField(serializers.FloatField):
    """A float as JSON, where NaN and ±infinity do not exist: those are ``null``. (The platform
    stores them as null anyway and keeps their kind beside them: ``metrics.nonfinite`` of a task,
    ``values.nonfinite`` of a metric point, e.g. ``{"loss": "nan", "grad_norm": "inf"}``.)"""

    def to_representation(self, value: Any) -> float | None:
        number = super().to_representation(value)
        return number if math.isfinite(number) else None


#: Model float columns are serialised with :class:`FiniteFloatField`.
_FINITE_FIELD_MAPPING = {**serializers.ModelSerializer.serializer_field_mapping, models.FloatField: FiniteFloatField}


def task_gpu_memory_usage(task: FinetuningTask) -> dict[str, dict[str, int]]:
    """The GPU memory of what the task's current run holds; nothing once the run has ended (the GPUs
    are someone else's then, and a list of ended tasks pinned to devices costs no query a row)."""
    if task.run is None or task.run.status not in RUN_HOLDING_STATUSES:
        return {}
    return run_gpu_memory_usage(task.run, task.gpu_config)


class TaskSerializer(serializers.ModelSerializer):
    """A task. ``loss``, ``learning_rate`` and ``current_epoch`` follow the latest training step; a
    value swift reported as NaN or ±infinity is ``null`` here and its kind is in
    ``metrics.nonfinite`` (``{"loss": "nan"}``), as are the summary's (``train_loss``)."""

    serializer_field_mapping = _FINITE_FIELD_MAPPING
    owner = serializers.CharField(source="owner.username", read_only=True)
    command_line = serializers.CharField(read_only=True)
    elapsed_seconds = FiniteFloatField(read_only=True)
    current_epoch = FiniteFloatField(source="epoch", read_only=True)
    stop_requested = serializers.SerializerMethodField()
    gpu_memory_usage = serializers.SerializerMethodField()
    can_resume = serializers.BooleanField(read_only=True, help_text="Stopped or failed, with a checkpoint.")
    can_export = serializers.BooleanField(read_only=True, help_text="A LoRA/QLoRA task (a full fine-tune needs no "
                                          "merge).")

    class Meta:
        model = FinetuningTask
        fields = [
            "id", "name", "description", "owner", "task_type", "train_type", "preset", "priority", "status",
            "progress", "current_step", "max_steps", "current_epoch", "loss", "learning_rate", "eta_seconds",
            "elapsed_seconds", "base_model", "model_source", "datasets", "training_args", "gpu_config",
            "memory_estimate_gb", "gpu_memory_usage", "held", "gpus", "master_port",
            "output_name", "output_path", "last_checkpoint", "log_file_path", "command", "command_line", "host",
            "pid", "exit_code", "error_message", "metrics", "last_log_seq", "stop_requested",
            "run_number", "resume_from", "auto_export", "can_resume", "can_export",
            "created_at", "queued_at", "started_at", "finished_at",
        ]
        read_only_fields = fields

    gpus = serializers.SerializerMethodField()

    def get_stop_requested(self, obj: FinetuningTask) -> bool:
        return obj.stop_requested_at is not None

    def get_gpus(self, obj: FinetuningTask) -> list[dict[str, Any]]:
        """What the scheduler reserved for the task: each GPU (index, UUID) or CPU slot."""
        return [
            {"host": obj.host, "index": r.gpu.index, "uuid": r.gpu.uuid, "name": r.gpu.name}
            if r.gpu_id else {"host": obj.host, "cpu_slot": r.cpu_slot}
            for r in (obj.run.reservations.all() if obj.run is not None else [])
        ]

    def get_gpu_memory_usage(self, obj: FinetuningTask) -> dict[str, dict[str, int]]:
        """Per assigned GPU index: memory used and total (MiB) and utilization (%)."""
        return task_gpu_memory_usage(obj)


class CheckpointSerializer(serializers.Serializer):
    """A checkpoint of one of the task's runs."""

    path = serializers.CharField(help_text="Absolute path; pass it (or the step) as checkpoint to resume/export.")
    name = serializers.CharField()
    step = serializers.IntegerField()
    run = serializers.CharField(help_text='"" for the first run, else the resumed run\'s folder (v0-…).')
    saved_at = serializers.DateTimeField()
    size_bytes = serializers.IntegerField()


class ExportSerializer(serializers.ModelSerializer):
    """A merge of a checkpoint's LoRA adapters into a full model (``swift export --merge_lora``)."""

    task = serializers.IntegerField(source="task_id", read_only=True)
    # A plain string in the schema: a second "status" enum next to the task's and the deployment's
    # would collide in drf-spectacular's enum naming.
    status = serializers.CharField(read_only=True, help_text="pending, running, completed or failed")
    checkpoint_name = serializers.CharField(read_only=True)
    log = serializers.CharField(source="log_text", read_only=True, help_text="The last lines of swift's output.")
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = TaskExport
        fields = ["id", "task", "checkpoint", "checkpoint_name", "step", "status", "output_path", "size_bytes",
                  "error_message", "exit_code", "host", "command", "log", "download_url", "created_at",
                  "started_at", "finished_at"]
        read_only_fields = fields

    def get_download_url(self, obj: TaskExport) -> str | None:
        """A zip of the merged folder, once the export has completed."""
        return f"/api/finetuning/exports/{obj.pk}/download/" if obj.status == "completed" else None


@extend_schema_field({"$ref": "#/components/schemas/TaskStatusEnum"})
class _TaskStatusField(serializers.CharField):
    """The task's status, documented as the task status enum of :class:`TaskSerializer`."""


class TaskDetailSerializer(TaskSerializer):
    """One task with its checkpoints (every run) and its exports."""

    # The task status enum by reference. drf-spectacular names an enum after its one component when a
    # field name has several choice sets (the task's and the deployment's "status"); a second
    # component carrying the same enum would leave it a hashed name and a warning.
    status = _TaskStatusField(read_only=True)
    checkpoints = serializers.SerializerMethodField()
    exports = serializers.SerializerMethodField()
    output_bytes = serializers.IntegerField(
        read_only=True, help_text="Bytes under the task's folder (checkpoints, merged models, logs), as last "
                                  "measured (output_measured_at): when a run or an export ends, every 10 minutes "
                                  "while it runs, and after its outputs are deleted.")
    output_measured_at = serializers.DateTimeField(read_only=True, allow_null=True)
    outputs_deleted_at = serializers.DateTimeField(
        read_only=True, allow_null=True,
        help_text="When its checkpoints and merged models were deleted (DELETE .../outputs/); null if never.")

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "checkpoints", "exports", "output_bytes", "output_measured_at",
                  "outputs_deleted_at"]
        read_only_fields = fields

    @extend_schema_field(CheckpointSerializer(many=True))
    def get_checkpoints(self, obj: FinetuningTask) -> list[dict[str, Any]]:
        from tasks.selectors import task_checkpoint_list

        return CheckpointSerializer(task_checkpoint_list(task=obj), many=True).data

    @extend_schema_field(ExportSerializer(many=True))
    def get_exports(self, obj: FinetuningTask) -> list[dict[str, Any]]:
        from tasks.selectors import task_export_list

        return ExportSerializer(task_export_list(task=obj), many=True).data


class CheckpointChoiceSerializer(JsonSerializer):
    """Which checkpoint: a step (8) or a folder of the task (absolute, or relative to its output
    folder: "checkpoint-8", "v0-…/checkpoint-12"). Default: the task's last checkpoint."""

    checkpoint = json_field({
        "anyOf": [{"type": "integer", "nullable": True}, {"type": "string", "nullable": True}],
        "description": "A step number (8) or a checkpoint folder of this task; null or left out: its last.",
    }, required=False, allow_null=True, default=None)


class LogLineSerializer(serializers.ModelSerializer):
    time = serializers.DateTimeField(source="created_at")

    class Meta:
        model = TaskLogLine
        fields = ["seq", "text", "time"]


class LogPageSerializer(serializers.Serializer):
    lines = LogLineSerializer(many=True)
    next = serializers.IntegerField(help_text="Pass as ?after= to get the lines that follow.")
    more = serializers.BooleanField(help_text="Lines follow: the answer stopped at its line or size limit.")


#: The largest cursor a query may give (a 64-bit id): a larger number is a 400, not a database error.
MAX_CURSOR = 2**63 - 1


class CursorQuerySerializer(QuerySerializer):
    """``after``: a cursor (what it counts is the action's: a step, an event id)."""

    def __init__(self, *args: Any, help_text: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if help_text:
            self.fields["after"].help_text = help_text

    after = serializers.IntegerField(required=False, min_value=0, max_value=MAX_CURSOR, default=0)


class MetricSerializer(serializers.ModelSerializer):
    """One logged step. A value swift reported as NaN or ±infinity is ``null``; ``values.nonfinite``
    names its kind (``{"loss": "nan", "grad_norm": "inf"}``)."""

    serializer_field_mapping = _FINITE_FIELD_MAPPING

    class Meta:
        model = TaskMetric
        fields = ["step", "kind", "epoch", "loss", "learning_rate", "grad_norm", "token_acc", "memory_gib",
                  "seconds_per_step", "values"]


class MetricPageSerializer(serializers.Serializer):
    """A page of metric points (``page``, ``page_size``; ``after`` a step) and swift's final summary."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = MetricSerializer(many=True)
    summary = serializers.DictField(help_text="swift's final summary (train_loss, runtime, …) once it ends.")


class EventSerializer(serializers.ModelSerializer):
    time = serializers.DateTimeField(source="created_at")

    class Meta:
        model = TaskEvent
        fields = ["id", "kind", "message", "data", "time"]


class EventPageSerializer(serializers.Serializer):
    """A page of a task's events (``page``, ``page_size``; ``after`` an event id)."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = EventSerializer(many=True)


class DatasetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)

    class Meta:
        model = Dataset
        fields = ["id", "name", "description", "owner", "original_filename", "file_type", "format", "rows",
                  "size_bytes", "columns", "created_at"]
        read_only_fields = fields


class DatasetUploadSerializer(serializers.Serializer):
    file = described_field(serializers.FileField, {
        "type": "string", "format": "binary", "minLength": 1,
        "description": "A .jsonl, .json or .csv file of dataset rows (not empty).",
    })
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    description = serializers.CharField(required=False, allow_blank=True, default="")


class LogQuerySerializer(QuerySerializer):
    after = serializers.IntegerField(required=False, min_value=0, max_value=MAX_CURSOR, default=0,
                                     help_text="Return lines with seq greater than this.")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=5000, default=1000,
                                     help_text="At most this many lines (default 1000).")


class PrioritySerializer(JsonSerializer):
    """A waiting task's new priority."""

    priority = serializers.IntegerField(
        min_value=0, max_value=10,
        help_text="0-10, larger runs first. Above FINETUNE_USER_MAX_PRIORITY (5 by default) for staff only.",
    )


class QueueRequestSerializer(serializers.Serializer):
    kind = serializers.CharField(help_text="gpu, cpu or auto (one GPU where the host has GPUs, else a CPU slot)")
    count = serializers.IntegerField()
    devices = serializers.ListField(child=serializers.CharField())
    min_memory_gb = serializers.FloatField(help_text="Per GPU: the task's gpu_config or its memory estimate.")


class QueueEntrySerializer(serializers.Serializer):
    """A waiting task; another user's task shows only its place, priority and request."""

    position = serializers.IntegerField()
    id = serializers.SerializerMethodField()
    name = serializers.SerializerMethodField()
    owner = serializers.SerializerMethodField()
    mine = serializers.SerializerMethodField()
    priority = serializers.IntegerField(source="task.priority")
    held = serializers.BooleanField(source="task.held")
    created_at = serializers.DateTimeField(source="task.created_at")
    requested = serializers.SerializerMethodField()
    estimated_start = serializers.DateTimeField(allow_null=True)
    note = serializers.CharField()

    def _user(self) -> Any:
        return self.context["request"].user

    def get_id(self, entry: Any) -> int | None:
        return entry.task.pk if entry.visible else None

    def get_name(self, entry: Any) -> str:
        return entry.task.name if entry.visible else str(_("another user's task"))

    def get_owner(self, entry: Any) -> str | None:
        return entry.task.owner.username if entry.visible else None

    def get_mine(self, entry: Any) -> bool:
        return entry.task.owner_id == self._user().pk

    @extend_schema_field(QueueRequestSerializer)
    def get_requested(self, entry: Any) -> dict[str, Any]:
        r = entry.request
        count = r.count if r.kind == "gpu" else (0 if r.kind == "cpu" else 1)
        return {"kind": r.kind, "count": count, "devices": list(r.devices),
                "min_memory_gb": round(r.min_memory_mb / 1024, 1)}

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from core.api import JsonSerializer, json_field
from core.query import QuerySerializer
from deployments.models import Deployment, DeploymentLogLine, InferenceBackend
from tasks.api.serializers import GPU_CONFIG_SCHEMA, MAX_CURSOR, gpu_config_cpu_is_boolean

#: A path whose folder names a file system takes (at most 255 characters each; a longer one is an
#: error of the file system, not a folder that is missing).
_FOLDER_NAMES = RegexValidator(r"^/?(?:[^/]{0,255}/)*[^/]{1,255}/?$",
                               "a folder name in the path is longer than 255 characters")


_SERVED_MODEL_NAME = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}$", "use 1-100 letters, digits, '_', '.', "
                                    "':' or '-', starting with a letter or digit")


class DeploymentCreateSerializer(JsonSerializer):
    """Serve a task's checkpoint (``task``, optional ``checkpoint`` and ``merged``) or a local model
    (``model``). The service checks everything else and names the field it refuses."""

    #: One of the two sources (``core.api.AutoSchema`` writes it as anyOf; both at once is a 400).
    schema_any_of = [
        {"required": ["task"], "properties": {"task": {"type": "integer", "nullable": False}}},
        {"required": ["model"], "properties": {"model": {"minLength": 1}}},
    ]

    name = serializers.CharField(max_length=200)
    task = serializers.IntegerField(required=False, allow_null=True, help_text="Id of one of your tasks.")
    checkpoint = serializers.CharField(required=False, allow_blank=True, max_length=1000,
                                       validators=[_FOLDER_NAMES],
                                       help_text="A checkpoint folder of the task (default: its last one).")
    merged = serializers.BooleanField(required=False, default=False,
                                      help_text="Serve the checkpoint's merged model (<checkpoint>-merged).")
    model = serializers.CharField(required=False, allow_blank=True, max_length=1000,
                                  help_text="A local model folder inside an allowed model root.")
    backend = serializers.ChoiceField(choices=InferenceBackend.choices, default=InferenceBackend.TRANSFORMERS)
    gpu_config = json_field(GPU_CONFIG_SCHEMA, required=False, validators=[gpu_config_cpu_is_boolean])
    deploy_args = json_field({
        "type": "object", "additionalProperties": True,
        "description": "Allow-listed swift deploy arguments, name → value: GET /api/deployments/options/ lists them.",
    }, required=False)
    served_model_name = serializers.CharField(
        required=False, allow_blank=True, max_length=100, validators=[_SERVED_MODEL_NAME],
        help_text="The model name clients send (default: from the name).",
    )


class DeploymentSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    task_name = serializers.CharField(source="task.name", read_only=True, default=None)
    endpoint = serializers.SerializerMethodField()
    command_line = serializers.CharField(read_only=True)
    total_tokens = serializers.IntegerField(read_only=True)
    stop_requested = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = [
            "id", "name", "owner", "status", "source", "task", "task_name", "model_path", "base_model", "backend",
            "deploy_args", "served_model_name", "gpu_config", "memory_estimate_gb", "host", "port", "endpoint",
            "pid", "command", "command_line", "error_message", "stop_reason", "exit_code", "last_log_seq",
            "request_count", "prompt_tokens", "completion_tokens", "total_tokens", "last_request_at",
            "stop_requested", "created_at", "started_at", "ready_at", "stopped_at",
        ]
        read_only_fields = fields

    def get_endpoint(self, obj: Deployment) -> str:
        """The ``base_url`` for an OpenAI client (absolute when the request is known)."""
        path = f"/api/deployments/{obj.pk}/v1"
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path

    def get_stop_requested(self, obj: Deployment) -> bool:
        return obj.stop_requested_at is not None


class DeploymentLogLineSerializer(serializers.ModelSerializer):
    time = serializers.DateTimeField(source="created_at")

    class Meta:
        model = DeploymentLogLine
        fields = ["seq", "text", "time"]


class DeploymentLogPageSerializer(serializers.Serializer):
    lines = DeploymentLogLineSerializer(many=True)
    next = serializers.IntegerField(help_text="Pass as ?after= to get the lines that follow.")
    status = serializers.CharField(help_text="The deployment's status now.")


class DeploymentLogQuerySerializer(QuerySerializer):
    after = serializers.IntegerField(required=False, min_value=0, max_value=MAX_CURSOR, default=0,
                                     help_text="Return lines with seq greater than this.")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=5000, default=1000,
                                     help_text="At most this many lines (default 1000).")


def create_kwargs(data: dict[str, Any]) -> dict[str, Any]:
    """Validated input → the service's keyword arguments."""
    return {key: data[key] for key in ("name", "task", "checkpoint", "merged", "model", "backend", "gpu_config",
                                       "deploy_args", "served_model_name") if key in data}

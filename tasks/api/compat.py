"""The seed system's six calls (seeds/002, "API 接口"), unchanged for clients written against it.

``/finetuning/createTask``, ``deleteTask``, ``stopTask``, ``getTask``, ``getTaskList`` and
``getTaskLog`` take the seed's camelCase fields and map onto the same services and selectors as
``/api/finetuning/``. Responses use the envelope ``{"code": 0, "message": "success", "data": …}``;
errors keep the HTTP status (400, 401, 404) with ``code`` equal to it and ``errors`` naming fields.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import parsers, serializers, status
from rest_framework.decorators import api_view, parser_classes
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import JsonSerializer, described_field, json_field
from core.errors import ServiceValidationError
from core.query import KeysFirst, query_value, single_value
from tasks import selectors, services
from tasks.api.serializers import (
    GPU_CONFIG_SCHEMA,
    MAX_CURSOR,
    PRESET_SCHEMA,
    gpu_config_cpu_is_boolean,
    task_gpu_memory_usage,
)
from tasks.api.views import LOG_PAGE_CHARS, stop_and_wait, task_create_from_input
from tasks.models import FinetuningTask, TaskStatus, TaskType, TrainType
from tasks.paths import is_hub_dataset_id

#: ``getTaskList`` pages beyond this are refused (the offset would overflow the database's integers).
MAX_PAGE = 1_000_000
#: The most log lines one ``getTaskLog`` answer carries.
LOG_LINES = 5000

_FIELD_NAMES = {
    "name": "name", "description": "description", "base_model": "baseModel", "datasets": "datasetPath",
    "output_name": "outputPath", "training_args": "trainingArgs", "gpu_config": "gpuConfig",
    "task_type": "taskType", "train_type": "trainType", "priority": "priority", "preset": "preset",
}


def _ok(data: Any, http_status: int = status.HTTP_200_OK) -> Response:
    return Response({"code": 0, "message": "success", "data": data}, status=http_status)


def _error(message: str, http_status: int, errors: dict[str, Any] | None = None) -> Response:
    body: dict[str, Any] = {"code": http_status, "message": message}
    if errors:
        body["errors"] = errors
    return Response(body, status=http_status)


def _epoch(moment: Any) -> int | None:
    return int(moment.timestamp()) if moment else None


def task_as_seed(task: FinetuningTask) -> dict[str, Any]:
    """A task in the seed's field names (timestamps as Unix seconds, as the seed's int64 fields)."""
    return {
        "id": task.pk, "name": task.name, "description": task.description, "userId": task.owner_id,
        "status": task.status, "progress": task.progress, "baseModel": task.base_model,
        "datasetPath": task.datasets, "outputPath": task.output_path, "outputName": task.output_name,
        "trainingArgs": task.training_args, "gpuConfig": task.gpu_config, "command": task.command_line,
        "logFilePath": task.log_file_path, "errorMessage": task.error_message,
        "startTime": _epoch(task.started_at), "endTime": _epoch(task.finished_at), "pid": task.pid,
        "metrics": {**task.metrics, "loss": task.loss, "learning_rate": task.learning_rate},
        "currentStep": task.current_step, "maxSteps": task.max_steps, "currentEpoch": task.epoch,
        "etaSeconds": task.eta_seconds, "taskType": task.task_type, "trainType": task.train_type,
        "priority": task.priority, "createdAt": _epoch(task.created_at),
        "memoryEstimateGb": task.memory_estimate_gb, "gpuMemoryUsage": task_gpu_memory_usage(task),
    }


def _resolve_dataset_path(user: Any, value: Any) -> list[Any]:
    refs = value if isinstance(value, list) else [value]
    resolved: list[Any] = []
    for ref in refs:
        if isinstance(ref, int) and not isinstance(ref, bool):
            resolved.append(ref)
            continue
        text = str(ref).strip() if ref is not None else ""
        dataset = selectors.dataset_find(user=user, ref=text) if text else None
        if dataset is not None:
            resolved.append(dataset.pk)
        elif is_hub_dataset_id(text):
            resolved.append(text)
        else:
            raise ServiceValidationError(
                {"datasets": f"{text!r} is not one of your uploaded datasets (by id or name) nor a hub dataset id"}
            )
    return resolved


def _whole_number(params: Any, *names: str, default: int, most: int) -> int:
    """The first of ``names`` (spellings of one parameter) in the query as a whole number, at most
    ``most`` in size (a larger one would overflow the database's integers); a 400 that names the
    parameter otherwise, for each spelling given."""
    values = []
    for name in (n for n in names if n in params):
        raw = single_value(params, name) or ""
        try:
            value = int(raw) if _INTEGER.fullmatch(raw) else None
        except ValueError:  # a number of more than 4300 digits
            value = None
        if value is None or abs(value) > most:
            raise ValidationError({name: [f"must be a whole number of at most {most:,}"]})
        values.append(value)
    return values[0] if values else default


#: A whole number as the seed's calls read it from a query or a body: ASCII digits, an optional sign.
_INTEGER = re.compile(r"[-+]?[0-9]+")


def _seed_errors(errors: dict[str, Any]) -> dict[str, Any]:
    return {_FIELD_NAMES.get(key, key): value for key, value in errors.items()}


def _task_id(request: Request) -> int:
    """The task a call names: ``?id=<n>``, else the body's ``id`` (or ``taskId``): a whole number."""
    raw: Any = query_value(request, "id")
    if raw is None and request.method != "GET" and isinstance(request.data, dict):
        raw = request.data.get("id", request.data.get("taskId"))
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and _INTEGER.fullmatch(raw):
        try:
            return int(raw)
        except ValueError:  # more than 4300 digits: no such task
            raise Http404 from None
    raise ValidationError({"id": ["give the task id as ?id=<n> or {\"id\": n}"]})


def _get_task(request: Request) -> FinetuningTask:
    return selectors.finetuning_task_get(user=request.user, pk=_task_id(request))


def _handle(func: Any) -> Any:
    """Map service and lookup errors onto the seed envelope."""

    def wrapper(request: Request) -> Response:
        try:
            return func(request)
        except ServiceValidationError as exc:
            return _error("invalid request", status.HTTP_400_BAD_REQUEST, _seed_errors(exc.errors))
        except ValidationError as exc:
            return _error("invalid request", status.HTTP_400_BAD_REQUEST, _seed_errors(dict(exc.detail)))
        except Http404:
            return _error("task not found", status.HTTP_404_NOT_FOUND)
        except ParseError as exc:  # a body that is not JSON
            return _error(str(exc.detail), exc.status_code)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


# --- the schema of the seed's calls ------------------------------------------------------------------
class SeedCreateTaskSerializer(JsonSerializer):
    """``createTask``'s body, in the seed's field names. As in the seed, an empty value (``""``,
    ``null``, ``0``, ``[]``, ``{}``) of an optional field means "the default"."""

    #: A preset, or the three fields a task needs (``core.api.AutoSchema`` writes it as anyOf).
    schema_any_of = [
        {"required": ["preset"], "properties": {"preset": {"type": "string", "pattern": r"\S"}}},
        {"required": ["name", "baseModel", "datasetPath"],
         "properties": {"name": {"type": "string", "pattern": r"\S"}, "baseModel": {"type": "string", "pattern": r"\S"},
                        "datasetPath": {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1},
                                                  {"type": "array", "minItems": 1, "maxItems": 32}]}}},
    ]

    name = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, allow_null=True, trim_whitespace=False)
    baseModel = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=1000,  # noqa: N815
                                      help_text="A hub model id (owner/name) or a model folder under a model root.")
    # Not read with a preset: its shape is in schema_any_of's second branch.
    datasetPath = json_field({  # noqa: N815
        "description": "Your uploaded datasets (by id or name) and/or hub dataset ids: one, or a list of up to 32.",
    }, required=False, allow_null=True)
    outputPath = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=200,  # noqa: N815
                                       help_text="A name for the output (the platform picks the folder).")
    trainingArgs = json_field({  # noqa: N815
        "description": "Allow-listed swift training arguments, an object (GET /api/finetuning/training-args/); "
                       "not read with a preset.",
    }, required=False, allow_null=True)
    gpuConfig = json_field({**GPU_CONFIG_SCHEMA, "nullable": True}, required=False, allow_null=True,  # noqa: N815
                           validators=[gpu_config_cpu_is_boolean])
    taskType = serializers.ChoiceField(choices=TaskType.choices, required=False, allow_blank=True,  # noqa: N815
                                       allow_null=True)
    trainType = serializers.ChoiceField(choices=TrainType.choices, required=False, allow_blank=True,  # noqa: N815
                                        allow_null=True)
    priority = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=10)
    preset = described_field(serializers.CharField, {**PRESET_SCHEMA, "nullable": True}, required=False,
                             allow_blank=True, allow_null=True, max_length=64)


#: A task id in a body: a whole number, or its digits as a string.
_ID_VALUE = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[-+]?[0-9]+$"}]}


class SeedTaskIdSerializer(serializers.Serializer):
    """The body of ``stopTask`` and of ``deleteTask`` by ``POST`` (``?id=<n>`` works as well)."""

    schema_any_of = [{"required": ["id"]}, {"required": ["taskId"]}]

    id = json_field(_ID_VALUE, required=False)
    taskId = json_field({**_ID_VALUE, "description": "The same as id."}, required=False)  # noqa: N815


_SEED_TASK = {
    "type": "object",
    "description": "A task in the seed's field names (times in Unix seconds).",
    "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "description": {"type": "string"},
        "userId": {"type": "integer"}, "status": {"type": "string", "enum": TaskStatus.values},
        "progress": {"type": "number"}, "baseModel": {"type": "string"},
        "datasetPath": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
        "outputPath": {"type": "string"}, "outputName": {"type": "string"},
        "trainingArgs": {"type": "object"}, "gpuConfig": {"type": "object"}, "command": {"type": "string"},
        "logFilePath": {"type": "string"}, "errorMessage": {"type": "string"},
        "startTime": {"type": "integer", "nullable": True}, "endTime": {"type": "integer", "nullable": True},
        "pid": {"type": "integer", "nullable": True}, "metrics": {"type": "object"},
        "currentStep": {"type": "integer"}, "maxSteps": {"type": "integer"},
        "currentEpoch": {"type": "number", "nullable": True}, "etaSeconds": {"type": "number", "nullable": True},
        "taskType": {"type": "string", "enum": TaskType.values},
        "trainType": {"type": "string", "enum": TrainType.values},
        "priority": {"type": "integer"}, "createdAt": {"type": "integer"},
        "memoryEstimateGb": {"type": "number", "nullable": True}, "gpuMemoryUsage": {"type": "object"},
    },
    "required": ["id", "name", "status", "userId", "createdAt"],
}


def _envelope(data: dict[str, Any] | None, description: str = "") -> OpenApiResponse:
    """``{"code": 0, "message": "success", "data": …}``."""
    return OpenApiResponse(description=description, response={
        "type": "object", "required": ["code", "message", "data"],
        "properties": {"code": {"type": "integer", "enum": [0]}, "message": {"type": "string"},
                       "data": data if data is not None else {"type": "object", "nullable": True}},
    })


def _error_envelope(description: str) -> OpenApiResponse:
    """``{"code": <the HTTP status>, "message": …, "errors": {field: [messages]}}``."""
    return OpenApiResponse(description=description, response={
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                       "errors": {"$ref": "#/components/schemas/ValidationError"}},
    })


_INVALID = _error_envelope("Invalid input (errors names the fields in the seed's spelling), or an action the "
                           "task's state does not allow.")
_NOT_FOUND = _error_envelope("No such task among yours.")
_ID = OpenApiParameter("id", {"type": "integer"}, required=True, description="The task's id.")


def _seed(*, request: Any = None, data: dict[str, Any] | None, parameters: list[Any] = (), lookup: bool = True,
          methods: list[str] | None = None, description: str = "") -> Any:
    responses = {200: _envelope(data, description), 400: _INVALID}
    if lookup:
        responses[404] = _NOT_FOUND
    return extend_schema(tags=["seed-compatible"], request=request, parameters=list(parameters),
                         responses=responses, methods=methods)


_TASK_LIST = {
    "type": "object", "required": ["list", "total", "page", "pageSize"],
    "properties": {"list": {"type": "array", "items": _SEED_TASK}, "total": {"type": "integer"},
                   "page": {"type": "integer"}, "pageSize": {"type": "integer"}},
}
_TASK_LOG = {
    "type": "object", "required": ["lines", "next", "more", "status"],
    "properties": {
        "lines": {"type": "array", "items": {
            "type": "object", "required": ["seq", "text", "time"],
            "properties": {"seq": {"type": "integer"}, "text": {"type": "string"},
                           "time": {"type": "string", "format": "date-time"}},
        }},
        "next": {"type": "integer"}, "more": {"type": "boolean"},
        "status": {"type": "string", "enum": TaskStatus.values},
    },
}
#: A whole number a parameter may be, in size (larger ones would overflow the database's integers).
_PAGE_NUMBER = {"type": "integer", "minimum": -MAX_PAGE, "maximum": MAX_PAGE}
_CURSOR = {"type": "integer", "minimum": -MAX_CURSOR, "maximum": MAX_CURSOR}


# --- the calls --------------------------------------------------------------------------------------------
@_seed(request={"application/json": SeedCreateTaskSerializer}, data=_SEED_TASK, lookup=False)
@api_view(["POST"])
@parser_classes([parsers.JSONParser])
@_handle
def create_task(request: Request) -> Response:
    """Create a task from the seed's camelCase body."""
    body = SeedCreateTaskSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    given = body.validated_data
    data: dict[str, Any] = {
        "name": given.get("name") or "", "description": given.get("description") or "",
        "base_model": given.get("baseModel") or "", "training_args": given.get("trainingArgs"),
        "gpu_config": given.get("gpuConfig"), "output_name": given.get("outputPath") or "",
        "task_type": given.get("taskType") or "sft", "train_type": given.get("trainType") or "lora",
        "priority": given.get("priority"), "preset": given.get("preset") or "",
    }
    if not data["preset"]:
        missing = {seed: ["This field is required."] for seed, value in
                   (("name", data["name"]), ("baseModel", data["base_model"]),
                    ("datasetPath", given.get("datasetPath"))) if value in (None, "", [])}
        if missing:
            return _error("invalid request", status.HTTP_400_BAD_REQUEST, missing)
        data["datasets"] = _resolve_dataset_path(request.user, given.get("datasetPath"))
    task = task_create_from_input(user=request.user, data=data)
    return _ok(task_as_seed(task))


@_seed(methods=["DELETE"], parameters=[_ID], data=None, description="data is null.")
@_seed(methods=["POST"], request={"application/json": SeedTaskIdSerializer}, data=None, description="data is null.")
@api_view(["DELETE", "POST"])
@parser_classes([parsers.JSONParser])
@_handle
def delete_task(request: Request) -> Response:
    """Delete a task (stops it first; the model output stays on disk)."""
    services.finetuning_task_delete(task=_get_task(request))
    return _ok(None)


@_seed(request={"application/json": SeedTaskIdSerializer}, data=_SEED_TASK)
@api_view(["POST"])
@parser_classes([parsers.JSONParser])
@_handle
def stop_task(request: Request) -> Response:
    """Stop a task gracefully."""
    return _ok(task_as_seed(stop_and_wait(_get_task(request))))


@_seed(parameters=[_ID], data=_SEED_TASK)
@api_view(["GET"])
@_handle
def get_task(request: Request) -> Response:
    """A task's details."""
    return _ok(task_as_seed(_get_task(request)))


@_seed(lookup=False, data=_TASK_LIST, parameters=[
    OpenApiParameter("page", _PAGE_NUMBER, description="The page (default 1; below 1 counts as 1)."),
    OpenApiParameter("pageSize", _PAGE_NUMBER, description="Tasks a page (default 10; clamped to 1-100)."),
    OpenApiParameter("size", _PAGE_NUMBER, description="The same as pageSize."),
    OpenApiParameter("status", {"type": "string", "enum": ["", *TaskStatus.values]},
                     description="Only tasks in this status (empty: all)."),
    OpenApiParameter("name", {"type": "string", "pattern": "^[^\\x00]*$"},
                     description="Only tasks whose name contains this (any case)."),
])
@api_view(["GET"])
@_handle
def get_task_list(request: Request) -> Response:
    """Your tasks, newest first: ``?page=1&pageSize=10&status=running&name=<search>``."""
    params = request.query_params
    page = max(1, _whole_number(params, "page", default=1, most=MAX_PAGE))
    size = min(100, max(1, _whole_number(params, "pageSize", "size", default=10, most=MAX_PAGE)))
    qs = selectors.finetuning_task_list(user=request.user)
    wanted = query_value(request, "status")
    if wanted:
        if wanted not in TaskStatus.values:
            raise ValidationError({"status": [f"must be one of: {', '.join(TaskStatus.values)}"]})
        qs = qs.filter(status=wanted)
    name = query_value(request, "name")
    if name and "\x00" in name:
        raise ValidationError({"name": ["must not contain NUL characters"]})
    if name:
        qs = qs.filter(name__icontains=name)
    tasks = KeysFirst(qs)  # a deep page walks an index, not the table
    total = tasks.count()
    rows = tasks[(page - 1) * size : page * size]
    return _ok({"list": [task_as_seed(t) for t in rows], "total": total, "page": page, "pageSize": size})


@_seed(data=_TASK_LOG, parameters=[
    _ID,
    OpenApiParameter("after", _CURSOR, description="Lines with seq greater than this (default 0; below 0 counts "
                                                   "as 0)."),
    OpenApiParameter("limit", _CURSOR, description="At most this many lines (default and at most 5000; below 1 "
                                                   "counts as 1)."),
])
@api_view(["GET"])
@_handle
def get_task_log(request: Request) -> Response:
    """A task's log: ``?id=<n>&after=<seq>&limit=<n>``, at most 5000 lines and about 1 MB of text an
    answer; ``more`` says that lines follow (ask again with ``after=next``)."""
    task = _get_task(request)
    after = max(0, _whole_number(request.query_params, "after", default=0, most=MAX_CURSOR))
    limit = min(LOG_LINES, max(1, _whole_number(request.query_params, "limit", default=LOG_LINES, most=MAX_CURSOR)))
    lines, more = selectors.task_log_page(task=task, after=after, limit=limit, max_chars=LOG_PAGE_CHARS)
    return _ok({
        "lines": [{"seq": line.seq, "text": line.text, "time": line.created_at.isoformat()} for line in lines],
        "next": lines[-1].seq if lines else after,
        "more": more,
        "status": task.status,
    })

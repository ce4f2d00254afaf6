"""The seed system's six calls (seeds/002, "API 接口"), unchanged for clients written against it.

``/finetuning/createTask``, ``deleteTask``, ``stopTask``, ``getTask``, ``getTaskList`` and
``getTaskLog`` take the seed's camelCase fields and map onto the same services and selectors as
``/api/finetuning/``. Responses use the envelope ``{"code": 0, "message": "success", "data": …}``;
errors keep the HTTP status (400, 401, 404) with ``code`` equal to it and ``errors`` naming fields.
"""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.decorators import api_view
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from core.errors import ServiceValidationError
from gpus.selectors import run_gpu_memory_usage
from tasks import selectors, services
from tasks.api.views import stop_and_wait, task_create_from_input
from tasks.models import FinetuningTask, TaskStatus
from tasks.paths import is_hub_dataset_id

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
        "memoryEstimateGb": task.memory_estimate_gb, "gpuMemoryUsage": run_gpu_memory_usage(task.run, task.gpu_config),
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


def _seed_errors(errors: dict[str, Any]) -> dict[str, Any]:
    return {_FIELD_NAMES.get(key, key): value for key, value in errors.items()}


def _task_id(request: Request) -> int:
    raw = request.query_params.get("id")
    if raw is None and isinstance(request.data, dict):
        raw = request.data.get("id", request.data.get("taskId"))
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValidationError({"id": ["give the task id as ?id=<n> or {\"id\": n}"]}) from None


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

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


@extend_schema(tags=["seed-compatible"], request=dict, responses={200: dict})
@api_view(["POST"])
@_handle
def create_task(request: Request) -> Response:
    """Create a task from the seed's camelCase body."""
    body = request.data if isinstance(request.data, dict) else {}
    gpu = body.get("gpuConfig")
    data: dict[str, Any] = {
        "name": body.get("name") or "", "description": body.get("description") or "",
        "base_model": body.get("baseModel") or "", "training_args": body.get("trainingArgs"),
        "gpu_config": gpu, "output_name": body.get("outputPath") or "",
        "task_type": body.get("taskType") or "sft", "train_type": body.get("trainType") or "lora",
        "priority": body.get("priority", 5), "preset": body.get("preset") or "",
    }
    if not data["preset"]:
        missing = {seed: ["This field is required."] for seed, value in
                   (("name", data["name"]), ("baseModel", data["base_model"]),
                    ("datasetPath", body.get("datasetPath"))) if value in (None, "", [])}
        if missing:
            return _error("invalid request", status.HTTP_400_BAD_REQUEST, missing)
        data["datasets"] = _resolve_dataset_path(request.user, body.get("datasetPath"))
    task = task_create_from_input(user=request.user, data=data)
    return _ok(task_as_seed(task))


@extend_schema(tags=["seed-compatible"], request=None, responses={200: dict})
@api_view(["DELETE", "POST"])
@_handle
def delete_task(request: Request) -> Response:
    """Delete a task (stops it first; the model output stays on disk)."""
    services.finetuning_task_delete(task=_get_task(request))
    return _ok(None)


@extend_schema(tags=["seed-compatible"], request=None, responses={200: dict})
@api_view(["POST"])
@_handle
def stop_task(request: Request) -> Response:
    """Stop a task gracefully."""
    return _ok(task_as_seed(stop_and_wait(_get_task(request))))


@extend_schema(tags=["seed-compatible"], responses={200: dict})
@api_view(["GET"])
@_handle
def get_task(request: Request) -> Response:
    """A task's details."""
    return _ok(task_as_seed(_get_task(request)))


@extend_schema(tags=["seed-compatible"], responses={200: dict})
@api_view(["GET"])
@_handle
def get_task_list(request: Request) -> Response:
    """Your tasks, newest first: ``?page=1&pageSize=10&status=running&name=<search>``."""
    params = request.query_params
    try:
        page = max(1, int(params.get("page", 1)))
        size = min(100, max(1, int(params.get("pageSize", params.get("size", 10)))))
    except ValueError:
        raise ValidationError({"page": ["page and pageSize must be whole numbers"]}) from None
    qs = selectors.finetuning_task_list(user=request.user)
    if params.get("status"):
        if params["status"] not in TaskStatus.values:
            raise ValidationError({"status": [f"must be one of: {', '.join(TaskStatus.values)}"]})
        qs = qs.filter(status=params["status"])
    if params.get("name"):
        qs = qs.filter(name__icontains=params["name"])
    total = qs.count()
    rows = qs[(page - 1) * size : page * size]
    return _ok({"list": [task_as_seed(t) for t in rows], "total": total, "page": page, "pageSize": size})


@extend_schema(tags=["seed-compatible"], responses={200: dict})
@api_view(["GET"])
@_handle
def get_task_log(request: Request) -> Response:
    """A task's log: ``?id=<n>&after=<seq>&limit=<n>`` (the whole stored log by default)."""
    task = _get_task(request)
    try:
        after = max(0, int(request.query_params.get("after", 0)))
        limit = min(20000, max(1, int(request.query_params.get("limit", 20000))))
    except ValueError:
        raise ValidationError({"after": ["after and limit must be whole numbers"]}) from None
    lines = selectors.task_log_lines(task=task, after=after, limit=limit)
    return _ok({
        "lines": [{"seq": line.seq, "text": line.text, "time": line.created_at.isoformat()} for line in lines],
        "next": lines[-1].seq if lines else after,
        "content": "\n".join(line.text for line in lines),
        "status": task.status,
    })

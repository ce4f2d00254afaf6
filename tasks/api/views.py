"""The ``/api/finetuning/`` API. Every view scopes through the selectors (``for_user``), so another
user's task or dataset is a 404 on every route; every change goes through a service."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, StreamingHttpResponse
from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, parsers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import LOOKUP_VALUE_REGEX, error_response
from core.errors import ServiceValidationError
from core.query import FilterSet, KeysFirst, OrderingFilter, Pagination, SearchFilter
from core.streaming import file_chunks, streamed_download, zip_stream_response
from core.swift_cli.training_args import training_args_catalogue
from tasks import selectors, services, storage
from tasks.api.serializers import (
    CheckpointChoiceSerializer,
    CursorQuerySerializer,
    DatasetSerializer,
    DatasetUploadSerializer,
    EventPageSerializer,
    EventSerializer,
    ExportSerializer,
    LogPageSerializer,
    LogQuerySerializer,
    MetricPageSerializer,
    MetricSerializer,
    PrioritySerializer,
    QueueEntrySerializer,
    TaskCreateSerializer,
    TaskDetailSerializer,
    TaskSerializer,
)
from tasks.models import Dataset, FinetuningTask, TaskExport, TaskStatus, TaskType, TrainType
from tasks.paths import is_within
from tasks.presets import all_presets
from tasks.uploads import DatasetUploadLimit, declared_too_large, too_large_message

#: The most log text one answer carries (about 1 MB; lines are stored clipped at 8000 characters).
LOG_PAGE_CHARS = 1024 * 1024


class MetricPagination(Pagination):
    """Metric points: a chart needs many, so 1000 a page by default and ``page_size`` up to 5000."""

    page_size = 1000
    page_size_query_param = "page_size"
    max_page_size = 5000


class EventPagination(Pagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class QueuePagination(Pagination):
    """The queue: a page's estimates are computed for the tasks up to its end only."""

    page_size_query_param = "page_size"
    max_page_size = 200


def _page_parameters(pagination: type[Pagination]) -> list[OpenApiParameter]:
    """The page parameters of an action's own pagination (drf-spectacular adds them to lists only)."""
    return [OpenApiParameter(p["name"], p["schema"], description=p["description"])
            for p in pagination().get_schema_operation_parameters(None)]


def _after(request: Request) -> int:
    """The ``after`` cursor of a metrics or events read (0: from the start)."""
    query = CursorQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data["after"]


class TaskFilter(FilterSet):
    status = filters.ChoiceFilter(choices=TaskStatus.choices)
    task_type = filters.ChoiceFilter(choices=TaskType.choices)
    train_type = filters.ChoiceFilter(choices=TrainType.choices)

    class Meta:
        model = FinetuningTask
        fields = ["status", "task_type", "train_type"]


def task_create_from_input(*, user: Any, data: dict[str, Any]) -> FinetuningTask:
    """Shared by the API and the seed-compatible calls: one input, one service."""
    if data.get("preset"):
        return services.finetuning_task_create_from_preset(
            owner=user, preset=data["preset"], name=data.get("name") or "",
            description=data.get("description") or "", output_name=data.get("output_name") or "",
            gpu_config=data.get("gpu_config"), priority=data.get("priority"),
            auto_export=data.get("auto_export", False),
        )
    return services.finetuning_task_create(
        owner=user, name=data["name"], description=data.get("description") or "",
        task_type=data.get("task_type", TaskType.SFT), train_type=data.get("train_type", TrainType.LORA),
        base_model=data["base_model"], datasets=data.get("datasets"), training_args=data.get("training_args"),
        gpu_config=data.get("gpu_config"), priority=data.get("priority"),
        output_name=data.get("output_name") or "", auto_export=data.get("auto_export", False),
    )


def stop_and_wait(task: FinetuningTask) -> FinetuningTask:
    """Stop, then wait briefly so that most stops answer with the final ``stopped`` status."""
    task = services.finetuning_task_stop(task=task)
    deadline = time.monotonic() + settings.FINETUNE_STOP_WAIT_SECONDS
    while task.status == TaskStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
        task.refresh_from_db()
    return task


class TaskViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Fine-tuning tasks: list (filter ``status``, ``task_type``; ``search`` by name), create,
    detail (with checkpoints and exports), delete (stops it first; the model output stays on disk),
    stop, resume, export, logs, metrics, events."""

    serializer_class = TaskSerializer
    quota_actions = ("create", "resume")  # a 403 naming the quota (core.api.AutoSchema)
    lookup_value_regex = LOOKUP_VALUE_REGEX
    # JSON only: datasets, training_args, gpu_config and checkpoint are JSON values, which a form
    # cannot carry as the schema describes them.
    parser_classes = [parsers.JSONParser]
    filter_backends = [filters.DjangoFilterBackend, SearchFilter, OrderingFilter]
    filterset_class = TaskFilter
    search_fields = ["name"]
    ordering_fields = ["created_at", "priority", "status", "name"]

    def get_queryset(self) -> QuerySet[FinetuningTask]:
        return selectors.finetuning_task_list(user=self.request.user)

    def get_serializer_class(self) -> type[TaskSerializer]:
        return TaskDetailSerializer if self.action == "retrieve" else TaskSerializer

    def paginate_queryset(self, queryset: Any) -> list[Any] | None:
        # The list: a page's keys first, then its rows (a deep page walks an index, not the table).
        if self.action == "list" and isinstance(queryset, QuerySet):
            queryset = KeysFirst(queryset)
        return super().paginate_queryset(queryset)

    @extend_schema(request=TaskCreateSerializer, responses={201: TaskSerializer})
    def create(self, request: Request) -> Response:
        serializer = TaskCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        task = task_create_from_input(user=request.user, data=serializer.validated_data)
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        services.finetuning_task_delete(task=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        """Stop the task (SIGTERM to its process group, SIGKILL after the grace period). Idempotent."""
        task = stop_and_wait(self.get_object())
        return Response(TaskSerializer(task).data)

    @extend_schema(request=PrioritySerializer, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def priority(self, request: Request, pk: str | None = None) -> Response:
        """Change a waiting task's priority (0-10, larger first); it moves in the queue at once."""
        task = self.get_object()
        body = PrioritySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.finetuning_task_set_priority(task=task, priority=body.validated_data["priority"],
                                                     by=request.user)
        return Response(TaskSerializer(task, context={"request": request}).data)

    @extend_schema(request=None, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def hold(self, request: Request, pk: str | None = None) -> Response:
        """Keep a waiting task in the queue without starting it (a queued task gives back its GPUs)."""
        task = services.finetuning_task_hold(task=self.get_object())
        return Response(TaskSerializer(task, context={"request": request}).data)

    @extend_schema(request=None, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str | None = None) -> Response:
        """Let a held task start again; it kept its place in the queue."""
        task = services.finetuning_task_release(task=self.get_object())
        return Response(TaskSerializer(task, context={"request": request}).data)

    @extend_schema(request=None, responses={200: TaskSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Take a task out of the queue (the same as stop: a running task is stopped)."""
        return self.stop(request, pk)

    @extend_schema(request=CheckpointChoiceSerializer, responses={200: TaskDetailSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Resume a stopped or failed task from a checkpoint (``{"checkpoint": 8}`` or a folder of the
        task; default its last): a new run of the same task that goes back to the queue. Its log,
        metrics and events continue the task's history."""
        body = CheckpointChoiceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.finetuning_task_resume(task=self.get_object(), checkpoint=body.validated_data["checkpoint"])
        return Response(TaskDetailSerializer(task, context={"request": request}).data)

    @extend_schema(request=CheckpointChoiceSerializer, responses={201: ExportSerializer})
    @action(detail=True, methods=["post"])
    def export(self, request: Request, pk: str | None = None) -> Response:
        """Merge a checkpoint's LoRA adapters into a full model (``swift export --merge_lora``, queued
        on a worker, runs on the CPU). LoRA/QLoRA tasks only. Default: the task's last checkpoint."""
        body = CheckpointChoiceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        export = services.task_export_create(task=self.get_object(), checkpoint=body.validated_data["checkpoint"])
        return Response(ExportSerializer(export).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: ExportSerializer(many=True)})
    @action(detail=True, methods=["get"], pagination_class=None, filter_backends=[])  # a plain list
    def exports(self, request: Request, pk: str | None = None) -> Response:
        """The task's exports, newest first, with their status and log."""
        return Response(ExportSerializer(selectors.task_export_list(task=self.get_object()), many=True).data)

    @extend_schema(parameters=[LogQuerySerializer], responses={200: LogPageSerializer})
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str | None = None) -> Response:
        """Log lines after ``after``, in order, with contiguous sequence numbers: at most ``limit`` lines
        and about 1 MB of text; ``more`` says whether lines follow (ask again with ``after=next``)."""
        task = self.get_object()
        query = LogQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        after = query.validated_data["after"]
        lines, more = selectors.task_log_page(task=task, after=after, limit=query.validated_data["limit"],
                                              max_chars=LOG_PAGE_CHARS)
        next_seq = lines[-1].seq if lines else after
        return Response(LogPageSerializer({"lines": lines, "next": next_seq, "more": more}).data)

    @extend_schema(responses={(200, "text/plain"): bytes})
    @action(detail=True, methods=["get"], url_path="logs/download")
    def logs_download(self, request: Request, pk: str | None = None) -> StreamingHttpResponse:
        """The complete log file as plain text."""
        task = self.get_object()
        path = Path(task.log_file_path)
        if not task.log_file_path or not path.is_file():
            raise Http404("This task has no log file yet.")
        return streamed_download(request, file_chunks(path), content_type="text/plain; charset=utf-8",
                                 filename=f"task-{task.pk}.log")

    @extend_schema(parameters=[CursorQuerySerializer(help_text="Only points of steps after this one (a chart's "
                                                                "last step)."), *_page_parameters(MetricPagination)],
                   responses={200: MetricPageSerializer})
    @action(detail=True, methods=["get"], pagination_class=MetricPagination)
    def metrics(self, request: Request, pk: str | None = None) -> Response:
        """One point per logging step (and per evaluation), by step, a page at a time; plus swift's final
        summary."""
        task = self.get_object()
        after = _after(request)
        page = self.paginate_queryset(selectors.task_metric_points(task=task, after_step=after))
        response = self.get_paginated_response(MetricSerializer(page, many=True).data)
        response.data["summary"] = task.metrics
        return response

    @extend_schema(parameters=[CursorQuerySerializer(help_text="Only events after the one with this id."),
                               *_page_parameters(EventPagination)],
                   responses={200: EventPageSerializer})
    @action(detail=True, methods=["get"], pagination_class=EventPagination, filter_backends=[])
    def events(self, request: Request, pk: str | None = None) -> Response:
        """The task's lifecycle events, oldest first, a page at a time."""
        events = selectors.task_events(task=self.get_object(), after_id=_after(request))
        return self.get_paginated_response(EventSerializer(self.paginate_queryset(events), many=True).data)

    @extend_schema(request=None, responses={
        200: TaskDetailSerializer,
        400: error_response(400, "Refused: the task runs or waits, one of its exports is active, or a deployment "
                                 "serves one of its checkpoints; the body names outputs."),
    })
    @action(detail=True, methods=["delete"])
    def outputs(self, request: Request, pk: str | None = None) -> Response:
        """Delete the task's checkpoints and merged models from disk to free space (its record, log,
        metrics, events and export history stay; it cannot be resumed, exported or deployed after).
        Answers the task with ``outputs_deleted_at`` set and ``output_bytes`` measured again."""
        task = storage.task_outputs_delete(task=self.get_object())
        return Response(TaskDetailSerializer(task, context={"request": request}).data)


class ExportViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One export (``GET /api/finetuning/exports/{id}/``) and its merged model as a zip."""

    serializer_class = ExportSerializer
    lookup_value_regex = LOOKUP_VALUE_REGEX

    def get_queryset(self) -> QuerySet[TaskExport]:
        visible = selectors.finetuning_task_list(user=self.request.user)
        return TaskExport.objects.for_user(self.request.user).filter(task__in=visible).select_related("task")

    @extend_schema(responses={(200, "application/zip"): bytes,
                              400: error_response(400, "The export has not completed (yet): the body names status.")})
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: str | None = None) -> Any:
        """The merged model folder as a zip, streamed (only once the export has completed)."""
        export = self.get_object()
        if export.status != "completed":
            raise ServiceValidationError({"status": f"the export is {export.status}; download it once it has "
                                          "completed"})
        folder = Path(export.output_path)
        if not folder.is_dir() or not is_within(folder, Path(export.task.output_path)):
            raise Http404("The merged model's folder is gone.")
        return zip_stream_response(request, folder, filename=f"task-{export.task_id}-{folder.name}.zip")


class QueueView(APIView):
    """Every waiting task in the order it will start, with its position, what it asks for and an
    estimated start from the running tasks' ETAs, a page at a time. Other users' tasks appear without
    name or id."""

    pagination_class = QueuePagination

    @extend_schema(responses={200: QueueEntrySerializer(many=True)})
    def get(self, request: Request) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(selectors.QueuePages(user=request.user), request, view=self)
        entries = QueueEntrySerializer(page, many=True, context={"request": request}).data
        return paginator.get_paginated_response(entries)


class DatasetViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Your uploaded datasets. Upload with ``multipart/form-data`` (``file``, optional ``name``)."""

    serializer_class = DatasetSerializer
    quota_actions = ("create",)  # storage
    lookup_value_regex = LOOKUP_VALUE_REGEX
    parser_classes = [parsers.MultiPartParser, parsers.FormParser, parsers.JSONParser]
    filter_backends = [SearchFilter]
    search_fields = ["name", "original_filename"]

    upload_limit: DatasetUploadLimit | None = None

    def get_queryset(self) -> QuerySet[Dataset]:
        return selectors.dataset_list(user=self.request.user)

    def initialize_request(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Request:
        # Before DRF authenticates (a session's CSRF check reads request.POST) or parses the body.
        if request.method == "POST":
            self.upload_limit = DatasetUploadLimit.install(request)
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(request={"multipart/form-data": DatasetUploadSerializer}, responses={
        201: DatasetSerializer,
        400: error_response(400, "Not a dataset (the body names file), or a file over FINETUNE_MAX_DATASET_MB."),
        411: error_response(411, "A body without a Content-Length (chunked), refused by the web server before "
                                 "it is read: the body names file.", fields=True),
    })
    def create(self, request: Request) -> Response:
        """Upload a dataset. A file over ``FINETUNE_MAX_DATASET_MB`` is refused (400, ``file``) as soon as
        it passes the limit, or before it is read when the request's ``Content-Length`` says so."""
        if declared_too_large(request):  # refused unread, whatever the body's type
            raise ServiceValidationError({"file": too_large_message()})
        data = request.data  # a multipart body is parsed through the limit
        if self.upload_limit is not None and self.upload_limit.refused:
            raise ServiceValidationError({"file": too_large_message()})
        serializer = DatasetUploadSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        dataset = services.dataset_create(
            owner=request.user, upload=serializer.validated_data["file"],
            name=serializer.validated_data["name"], description=serializer.validated_data["description"],
        )
        return Response(DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        services.dataset_delete(dataset=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class PresetListView(APIView):
    """Presets: create a task with ``{"preset": "<name>"}`` (plus optional gpu_config, output_name)."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"results": [p.as_dict() for p in all_presets()]})


class TrainingArgsView(APIView):
    """The allowed training arguments with their types, ranges and defaults."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"results": training_args_catalogue()})

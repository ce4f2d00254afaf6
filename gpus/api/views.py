"""``/api/gpus/``: every GPU on every host with its state and holder; staff enable or drain."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import LOOKUP_VALUE_REGEX
from gpus import selectors, services
from gpus.models import Gpu, Host


class HostSerializer(serializers.ModelSerializer):
    live = serializers.BooleanField(source="is_live", read_only=True)

    class Meta:
        model = Host
        fields = ["name", "gpu_backend", "gpu_error", "cpu_slots", "enabled", "live", "last_seen_at"]
        read_only_fields = fields


class GpuSerializer(serializers.ModelSerializer):
    host = serializers.CharField(source="host.name", read_only=True)
    state = serializers.SerializerMethodField()
    holder = serializers.SerializerMethodField()

    class Meta:
        model = Gpu
        fields = [
            "id",
            "host",
            "index",
            "uuid",
            "name",
            "memory_total_mb",
            "memory_used_mb",
            "utilization_pct",
            "temperature_c",
            "enabled",
            "present",
            "state",
            "holder",
            "processes",
            "updated_at",
        ]
        read_only_fields = fields

    def get_state(self, gpu: Gpu) -> str:
        return selectors.gpu_state(gpu)

    def get_holder(self, gpu: Gpu) -> dict[str, Any] | None:
        """``{"kind": "task", "task": <id>, "name", "status"}`` (``"deployment": <id>`` for a
        deployment); the id is ``None`` and the name "another user's task" for anyone but its owner
        and staff."""
        holder = selectors.gpu_holder(gpu, self.context["request"].user)
        if holder is None:
            return None
        kind, subject = holder["kind"], holder.get("id")
        name = holder["name"] if subject is not None else f"another user's {kind}"
        return {"kind": kind, kind: subject, "name": name, "status": holder["status"]}


class IsStaff(permissions.BasePermission):
    message = "Only operators (staff) can enable or drain GPUs."

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_staff)


class GpuViewSet(viewsets.ReadOnlyModelViewSet):
    """Every GPU on every host: memory, utilization, state (free / reserved / draining / disabled /
    offline) and the task holding it. ``GET /api/gpus/hosts/`` lists hosts and their CPU slots."""

    serializer_class = GpuSerializer
    lookup_value_regex = LOOKUP_VALUE_REGEX
    queryset = Gpu.objects.none()
    pagination_class = None

    def get_queryset(self) -> Any:
        return selectors.gpu_list()

    @extend_schema(request=None, responses={200: GpuSerializer})
    @action(detail=True, methods=["post"], permission_classes=[IsStaff])
    def enable(self, request: Request, pk: str | None = None) -> Response:
        gpu = services.gpu_set_enabled(gpu=self.get_object(), enabled=True)
        return Response(GpuSerializer(gpu, context={"request": request}).data)

    @extend_schema(request=None, responses={200: GpuSerializer})
    @action(detail=True, methods=["post"], permission_classes=[IsStaff])
    def disable(self, request: Request, pk: str | None = None) -> Response:
        """Drain: the GPU takes no new task; the task on it finishes."""
        gpu = services.gpu_set_enabled(gpu=self.get_object(), enabled=False)
        return Response(GpuSerializer(gpu, context={"request": request}).data)

    @extend_schema(responses={200: HostSerializer(many=True)})
    @action(detail=False, methods=["get"])
    def hosts(self, request: Request) -> Response:
        return Response(HostSerializer(selectors.host_list(), many=True).data)

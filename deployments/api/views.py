"""The ``/api/deployments/`` API, with the same conventions as the task API: every view scopes
through the selectors (another user's deployment is a 404), every change goes through a service."""

from __future__ import annotations

import time
from typing import Any

from django import forms
from django.conf import settings
from django.db.models import QuerySet
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, parsers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import LOOKUP_VALUE_REGEX
from core.query import FilterSet, OrderingFilter, SearchFilter
from deployments import selectors, services
from deployments.api.serializers import (
    DeploymentCreateSerializer,
    DeploymentLogPageSerializer,
    DeploymentLogQuerySerializer,
    DeploymentSerializer,
    create_kwargs,
)
from deployments.command import available_backends, deploy_args_catalogue
from deployments.models import Deployment, DeploymentSource, DeploymentStatus, InferenceBackend
from tasks.api.serializers import MAX_CURSOR


class _WholeNumberFilter(filters.NumberFilter):
    """An id: a whole number within the database's integers (a larger one would overflow it)."""

    field_class = forms.IntegerField


class DeploymentFilter(FilterSet):
    status = filters.ChoiceFilter(choices=DeploymentStatus.choices)
    backend = filters.ChoiceFilter(choices=InferenceBackend.choices)
    source = filters.ChoiceFilter(choices=DeploymentSource.choices)
    # A number, not a choice among every task: another user's task id and a task that does not exist
    # must answer alike (an empty list), or the filter would tell which task ids exist (review L4).
    task = extend_schema_field({"type": "integer", "minimum": 1, "maximum": MAX_CURSOR})(
        _WholeNumberFilter(field_name="task_id", min_value=1, max_value=MAX_CURSOR))

    class Meta:
        model = Deployment
        fields = ["status", "backend", "source", "task"]


def stop_and_wait(deployment: Deployment) -> Deployment:
    """Stop, then wait briefly so that most stops answer with the final ``stopped`` status."""
    deployment = services.deployment_stop(deployment=deployment)
    deadline = time.monotonic() + settings.FINETUNE_STOP_WAIT_SECONDS
    while deployment.is_active and time.monotonic() < deadline:
        time.sleep(0.1)
        deployment.refresh_from_db()
    return deployment


class DeploymentViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Deployments: list (filter ``status``, ``backend``, ``source``, ``task``; ``search`` by name),
    create, detail, delete (stops it first), stop, logs. Call a running deployment with an OpenAI
    client at its ``endpoint`` using your API token as the key."""

    serializer_class = DeploymentSerializer
    quota_actions = ("create",)  # running deployments, GPUs at once
    lookup_value_regex = LOOKUP_VALUE_REGEX
    # JSON only: gpu_config and deploy_args are JSON values, which a form cannot carry as described.
    parser_classes = [parsers.JSONParser]
    filter_backends = [filters.DjangoFilterBackend, SearchFilter, OrderingFilter]
    filterset_class = DeploymentFilter
    search_fields = ["name", "served_model_name"]
    ordering_fields = ["created_at", "status", "name", "request_count"]

    def get_queryset(self) -> QuerySet[Deployment]:
        return selectors.deployment_list(user=self.request.user)

    @extend_schema(request=DeploymentCreateSerializer, responses={201: DeploymentSerializer})
    def create(self, request: Request) -> Response:
        serializer = DeploymentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        deployment = services.deployment_create(owner=request.user, **create_kwargs(serializer.validated_data))
        return Response(self.get_serializer(deployment).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        services.deployment_delete(deployment=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: DeploymentSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        """Stop the deployment (SIGTERM to its process group; GPU and port are freed). Idempotent."""
        deployment = stop_and_wait(self.get_object())
        return Response(self.get_serializer(deployment).data)

    @extend_schema(parameters=[DeploymentLogQuerySerializer], responses={200: DeploymentLogPageSerializer})
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str | None = None) -> Response:
        """Log lines after ``after``, in order, with contiguous sequence numbers."""
        deployment = self.get_object()
        query = DeploymentLogQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        after = query.validated_data["after"]
        lines = selectors.deployment_log_lines(deployment=deployment, after=after, limit=query.validated_data["limit"])
        page = {"lines": lines, "next": lines[-1].seq if lines else after, "status": deployment.status}
        return Response(DeploymentLogPageSerializer(page).data)


class DeploymentOptionsView(APIView):
    """What a deployment can be created with: the backends installed here and the deploy arguments."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"backends": available_backends(), "deploy_args": deploy_args_catalogue()})

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from accounts.api.serializers import ApiTokenCreateSerializer, ApiTokenSerializer, TokenObtainSerializer
from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke

_token_response = inline_serializer(
    "TokenResponse",
    {"token": serializers.CharField(), "id": serializers.IntegerField(), "name": serializers.CharField()},
)


class TokenObtainView(APIView):
    """Exchange a username and password for a new API token (shown once; stored hashed)."""

    permission_classes = [permissions.AllowAny]
    authentication_classes: list = []
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "login"

    @extend_schema(request=TokenObtainSerializer, responses={200: _token_response, 400: OpenApiResponse()})
    def post(self, request: Request) -> Response:
        serializer = TokenObtainSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        name = serializer.validated_data["name"] or "API token"
        token, raw = api_token_create(user=serializer.validated_data["user"], name=name)
        return Response({"token": raw, "id": token.pk, "name": token.name})


class ApiTokenViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Your API tokens. ``POST`` creates a named token; ``DELETE`` revokes one."""

    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.none()

    def get_queryset(self) -> QuerySet[ApiToken]:
        if getattr(self, "swagger_fake_view", False):
            return ApiToken.objects.none()
        # Tokens are personal even for staff: nobody lists or revokes another user's tokens here.
        return ApiToken.objects.filter(user=self.request.user)

    @extend_schema(request=ApiTokenCreateSerializer, responses={201: _token_response})
    def create(self, request: Request) -> Response:
        serializer = ApiTokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, raw = api_token_create(user=request.user, name=serializer.validated_data["name"])
        return Response({"token": raw, "id": token.pk, "name": token.name}, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: object, **kwargs: object) -> Response:
        api_token_revoke(token=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

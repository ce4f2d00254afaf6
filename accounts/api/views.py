from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, mixins, permissions, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api.serializers import ApiTokenCreateSerializer, ApiTokenSerializer, TokenObtainSerializer
from accounts.models import ApiToken
from accounts.security import token_login_succeeded
from accounts.services import api_token_create, api_token_revoke
from core.api import LOOKUP_VALUE_REGEX, error_response

_token_response = inline_serializer(
    "TokenResponse",
    {"token": serializers.CharField(), "id": serializers.IntegerField(), "name": serializers.CharField()},
)


class TokenObtainView(APIView):
    """Exchange a username and password for a new API token (shown once; stored hashed).

    Password guessing is limited like on every log-in form (django-axes, per user name and per client
    address): once locked out, the answer is 429 with a ``detail`` whatever the password. One
    mechanism for all log-ins, so DRF's rate throttle that used to sit here is gone."""

    permission_classes = [permissions.AllowAny]
    authentication_classes: list = []
    throttle_classes: list = []

    @extend_schema(
        request=TokenObtainSerializer,
        responses={
            200: _token_response,
            400: error_response(400, "Wrong user name or password (named under password), or invalid input."),
            429: error_response(429, "Locked out after too many failed log-ins: try again later."),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = TokenObtainSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        user = serializer.validated_data["user"]
        token_login_succeeded(request, user)
        name = serializer.validated_data["name"] or "API token"
        token, raw = api_token_create(user=user, name=name)
        return Response({"token": raw, "id": token.pk, "name": token.name})


class ApiTokenViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Your API tokens. ``POST`` creates a named token (from a logged-in session, not with a token);
    ``DELETE`` revokes one."""

    serializer_class = ApiTokenSerializer
    lookup_value_regex = LOOKUP_VALUE_REGEX
    queryset = ApiToken.objects.none()

    def get_queryset(self) -> QuerySet[ApiToken]:
        if getattr(self, "swagger_fake_view", False):
            return ApiToken.objects.none()
        # Tokens are personal even for staff: nobody lists or revokes another user's tokens here.
        return ApiToken.objects.filter(user=self.request.user)

    @extend_schema(request=ApiTokenCreateSerializer, responses={
        201: _token_response, 403: error_response(403, "An API token cannot create tokens (log in instead)."),
    })
    def create(self, request: Request) -> Response:
        # A token cannot mint tokens: revoking a leaked token must end what it could do. New tokens
        # come from a password (POST /api/auth/token/) or a logged-in session (the profile page).
        if isinstance(request.auth, ApiToken):
            raise exceptions.PermissionDenied(
                "An API token cannot create tokens: use POST /api/auth/token/ with your user name and "
                "password, or your profile page."
            )
        serializer = ApiTokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, raw = api_token_create(user=request.user, name=serializer.validated_data["name"])
        return Response({"token": raw, "id": token.pk, "name": token.name}, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: object, **kwargs: object) -> Response:
        api_token_revoke(token=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

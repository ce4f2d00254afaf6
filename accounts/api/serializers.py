from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from rest_framework import serializers

from accounts.models import ApiToken
from accounts.security import LoginLockedOut
from core.api import JsonSerializer


class TokenObtainSerializer(JsonSerializer):
    """A user name and password, and an optional name for the new token."""

    # User names are at most 150 characters; the bound keeps axes' attempt log within its columns.
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(style={"input_type": "password"}, trim_whitespace=False, max_length=4096)
    name = serializers.CharField(required=False, max_length=100, allow_blank=True, default="")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # Through authenticate(request=...) like every log-in form, so django-axes counts failures and
        # refuses a locked-out user name or address (accounts/security.py).
        request = self.context["request"]
        user = authenticate(request=request, username=attrs["username"], password=attrs["password"])
        if user is None:
            if getattr(request, "axes_locked_out", False):
                raise LoginLockedOut()
            raise serializers.ValidationError(
                {"password": ["Unable to log in with this username and password."]}, code="authorization"
            )
        attrs["user"] = user
        return attrs


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "key_prefix", "created_at", "last_used_at", "revoked_at", "is_active"]
        read_only_fields = fields


class ApiTokenCreateSerializer(JsonSerializer):
    """A name for the new token."""

    name = serializers.CharField(max_length=100)

"""API-wide conventions: errors always name the field, never a bare 500 for bad input, and the
OpenAPI schema says what every operation answers (its errors included), so a generated client can
rely on it (``tests/security/test_schemathesis.py`` holds the API to it).

* :func:`exception_handler`: a service's refusal is a 400 whose keys name the fields.
* :class:`AutoSchema`: every operation documents the errors it can give, with their bodies.
* :class:`JsonSerializer`: a JSON body's values have the JSON types the schema gives them;
  :func:`json_field` / :func:`described_field` give a field the shape the schema should show.
* :data:`LOOKUP_VALUE_REGEX`: every id in a path reaches the view (a JSON 404, not an HTML page).
* Query parameters are read strictly (:mod:`core.query`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import ResolvedComponent, force_instance
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import permissions, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from core.errors import QuotaExceeded, ServiceValidationError


def _as_lists(errors: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in errors.items():
        if isinstance(value, dict):
            out[field] = _as_lists(value)
        elif isinstance(value, (list, tuple)):
            out[field] = [str(v) for v in value]
        else:
            out[field] = [str(value)]
    return out


#: A viewset's ``lookup_value_regex``: any path segment reaches the view, whose lookup answers a JSON
#: 404 for an id that names nothing. (DRF's default ``[^/.]+`` leaves an id with a dot, "1.5", to
#: Django's HTML 404 page, which the schema does not describe.)
LOOKUP_VALUE_REGEX = "[^/]+"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, QuotaExceeded):
        body = {"detail": exc.detail, "quota": exc.quota, "limit": exc.limit, "used": exc.used}
        return Response(body, status=status.HTTP_403_FORBIDDEN)
    if isinstance(exc, ServiceValidationError):
        return Response(_as_lists(exc.errors), status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(exc, context)


# --- the schema: every operation's errors ---------------------------------------------------------------
ERROR = "Error"
VALIDATION_ERROR = "ValidationError"

#: The body of every refusal but a 400 (DRF's shape): what is wrong, in words.
_ERROR_SCHEMA = {
    "type": "object",
    "description": "A refusal in words (authentication, permission, not found, method, rate limit).",
    "properties": {"detail": {"type": "string", "description": "What is wrong, in words a user understands."}},
    "required": ["detail"],
}
#: The body of a 400: each key names a field (a nested key for a JSON field such as
#: ``training_args``) and says what is wrong; ``detail`` for a body that could not be parsed,
#: ``non_field_errors`` for what concerns several fields.
_MESSAGES = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}}
_VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "description": (
        "Invalid input. Each key names a field (or a key inside a JSON field, nested: "
        '``{"training_args": {"lr": ["..."]}}``) with what is wrong; ``detail`` when the body could not be '
        "read, ``non_field_errors`` for what concerns several fields."
    ),
    "additionalProperties": {"anyOf": [{"type": "string"}, _MESSAGES, {"type": "object"}]},
}

_DESCRIPTIONS = {
    400: "Invalid input, or an action the object's state does not allow: the body names the field.",
    401: "No credentials, or an invalid or revoked token.",
    403: "Authenticated, but not allowed to do this.",
    404: "No such object among yours (another user's object is a 404 too), or a page past the last.",
    415: "The body's media type is not one this operation reads (see the request body's content types).",
}
QUOTA_EXCEEDED = "QuotaExceeded"
#: The body of a 403 for a quota (``core.errors.QuotaExceeded``).
_QUOTA_SCHEMA = {
    "type": "object",
    "description": "Over one of your quotas (set by staff): which one, its limit and what you use now.",
    "properties": {
        "detail": {"type": "string", "description": "What is over the quota, in words."},
        "quota": {"type": "string", "enum": ["max_waiting_tasks", "max_gpus", "gpu_hours_per_week",
                                             "max_deployments", "max_storage_gb"]},
        "limit": {"type": "number", "description": "The quota (GB for max_storage_gb)."},
        "used": {"type": "number", "description": "What you use now, or what the request asks for."},
    },
    "required": ["detail", "quota", "limit", "used"],
}


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's schema, plus the errors each operation can answer, so that the schema says
    what the API does. An error an operation documents itself (``@extend_schema(responses=...)``)
    is kept; these are added where missing:

    * 400, :data:`VALIDATION_ERROR`: an operation with a request body or query parameters, and every
      ``POST``/``PUT``/``PATCH``/``DELETE`` (a service refuses what the object's state does not allow);
    * 401: an operation that authenticates (a missing, invalid or revoked token);
    * 403: a permission beyond being logged in (staff-only actions);
    * 403, :data:`QUOTA_EXCEEDED`: an action a quota can refuse (the view's ``quota_actions``: action
      names of a viewset, HTTP methods of a plain view);
    * 404: a path parameter (an object that is not yours is a 404), or a paginated list (a page past
      the last);
    * 415: a request body (a media type the operation does not read).
    """

    def get_operation(self, path: str, path_regex: str, path_prefix: str, method: str,
                      registry: Any) -> dict[str, Any] | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        parameters = operation.get("parameters", [])
        locations = {parameter["in"] for parameter in parameters}
        names = {parameter["name"] for parameter in parameters}
        codes = []
        if "requestBody" in operation or "query" in locations or self.method in {"POST", "PUT", "PATCH", "DELETE"}:
            codes.append(400)
        if self.view.get_authenticators():
            codes.append(401)
        if any(not isinstance(p, (permissions.AllowAny, permissions.IsAuthenticated))
               for p in self.view.get_permissions()):
            codes.append(403)
        if "path" in locations or "page" in names:
            codes.append(404)
        if "requestBody" in operation:
            codes.append(415)
        responses = operation["responses"]
        quota_limited = getattr(self.view, "quota_actions", ())
        if "403" not in responses and (getattr(self.view, "action", None) in quota_limited
                                       or self.method in quota_limited):
            responses["403"] = {
                "content": {"application/json": {"schema": self._error_component(QUOTA_EXCEEDED)}},
                "description": "Over one of your quotas, or not allowed to do this.",
            }
            codes = [code for code in codes if code != 403]
        for code in codes:
            if str(code) not in responses:
                name = VALIDATION_ERROR if code == 400 else ERROR
                responses[str(code)] = {
                    "content": {"application/json": {"schema": self._error_component(name)}},
                    "description": _DESCRIPTIONS[code],
                }
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def _resolve_path_parameters(self, variables: list[str]) -> list[dict[str, Any]]:
        """A path parameter matched by :data:`LOOKUP_VALUE_REGEX` is described by its model field (an
        integer id), as drf-spectacular does for DRF's default lookup pattern."""
        self.path_regex = self.path_regex.replace(f"(?P<pk>{LOOKUP_VALUE_REGEX})", "(?P<pk>[^/.]+)")
        return super()._resolve_path_parameters(variables)

    def _map_serializer_field(self, field: Any, direction: str, bypass_extensions: bool = False) -> dict[str, Any]:
        """Text as DRF reads it: never a NUL character; and when it may not be blank, a character
        that is not white space (DRF trims the value first, so "  " is blank)."""
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if (direction == "request" and isinstance(field, serializers.CharField) and schema.get("type") == "string"
                and "pattern" not in schema and "format" not in schema):
            blank_allowed = field.allow_blank or not field.trim_whitespace
            schema["pattern"] = r"^[^\x00]*$" if blank_allowed else r"^[^\x00]*[^\s\x00][^\x00]*$"
        return schema

    def _map_basic_serializer(self, serializer: Any, direction: str) -> dict[str, Any]:
        """A request serializer may name alternative sets of required fields (``schema_any_of``:
        a task from a preset or from scratch), which the schema writes as ``anyOf``."""
        schema = super()._map_basic_serializer(serializer, direction)
        any_of = getattr(serializer, "schema_any_of", None)
        if any_of and direction == "request":
            schema["anyOf"] = any_of
        return schema

    def _get_request_for_media_type(self, serializer: Any, direction: str = "request") -> tuple[Any, bool]:
        schema, required = super()._get_request_for_media_type(serializer, direction)
        return schema, required or bool(getattr(force_instance(serializer), "schema_any_of", None))

    def _error_component(self, name: str) -> dict[str, str]:
        component = ResolvedComponent(
            name=name, type=ResolvedComponent.SCHEMA, object=name,
            schema={VALIDATION_ERROR: _VALIDATION_ERROR_SCHEMA, QUOTA_EXCEEDED: _QUOTA_SCHEMA}.get(name, _ERROR_SCHEMA),
        )
        self.registry.register_on_missing(component)
        return component.ref


class JsonSerializer(serializers.Serializer):
    """A request body whose values have the JSON types the schema gives them. DRF's fields also take
    what a form sends (``5`` for a string field, ``"5"`` for a number, ``"yes"`` for a boolean); in a
    JSON body those are refused with the field's own message. A form body is read as DRF reads it."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping) and not hasattr(data, "getlist"):
            errors = {}
            for name, field in self.fields.items():
                value = data.get(name)
                if field.read_only or value is None or _json_type_fits(field, value):
                    continue
                key = "invalid_choice" if isinstance(field, serializers.ChoiceField) else "invalid"
                errors[name] = [field.error_messages[key].format(input=value)]
            if errors:
                raise ValidationError(errors)
        return super().to_internal_value(data)


def _json_type_fits(field: serializers.Field, value: Any) -> bool:
    if isinstance(field, (serializers.CharField, serializers.ChoiceField)):
        return isinstance(value, str)
    if isinstance(field, serializers.BooleanField):
        return isinstance(value, bool)
    if isinstance(field, (serializers.IntegerField, serializers.FloatField)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def described_field(field_class: type[serializers.Field], schema: dict[str, Any], **kwargs: Any) -> Any:
    """A serializer field that the schema describes as ``schema`` (a ``JSONField`` is "any value" to
    drf-spectacular; a ``CharField`` whose service knows the allowed values has no enum). A class of
    its own: DRF copies declared fields by their arguments, which would lose an annotation on the
    instance."""
    annotated = extend_schema_field(schema)(type(f"Described{field_class.__name__}", (field_class,), {}))
    return annotated(**kwargs)


def json_field(schema: dict[str, Any], **kwargs: Any) -> serializers.JSONField:
    """A ``JSONField`` described as ``schema``."""
    return described_field(serializers.JSONField, schema, **kwargs)


def error_response(code: int, description: str = "", *, fields: bool | None = None) -> OpenApiResponse:
    """An ``@extend_schema`` response for an error of the API's usual shape (a 429, a 411): the
    :data:`VALIDATION_ERROR` body (fields named) for a 400 or with ``fields=True``, the
    :data:`ERROR` body (a ``detail``) otherwise."""
    name = VALIDATION_ERROR if (code == 400 if fields is None else fields) else ERROR
    return OpenApiResponse(response={"$ref": f"#/components/schemas/{name}"},
                           description=description or _DESCRIPTIONS.get(code, ""))

"""Form helpers shared by every app's pages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms


def _message(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def place_service_errors(
    form: forms.Form, errors: dict[str, Any], *, nested: Mapping[str, str] | None = None,
    field_for: Mapping[str, str | None] | None = None,
) -> None:
    """Put each message of a :class:`core.errors.ServiceValidationError` next to its input.

    ``nested`` maps a JSON field whose errors are keyed (``{"training_args": {"lora_rank": "..."}}``)
    to the prefix of the form fields that edit its keys (``"arg_"``): each message goes next to
    ``arg_lora_rank``, or to the top of the form when there is no such input. ``field_for`` maps an
    error's field to the form field that shows it (a GPU request entered in one of several inputs).
    """
    nested = nested or {}
    field_for = field_for or {}
    for field, value in errors.items():
        if field in nested and isinstance(value, dict):
            for key, message in value.items():
                target = nested[field] + str(key).lstrip("-")
                if target in form.fields:
                    form.add_error(target, _message(message))
                else:
                    form.add_error(None, f"{key}: {_message(message)}")
        elif field in field_for:
            form.add_error(field_for[field], _message(value))
        elif field in form.fields and field not in form.errors:
            form.add_error(field, _message(value))
        else:
            form.add_error(None, _message(value) if field in ("preset", "__all__") else f"{field}: {_message(value)}")

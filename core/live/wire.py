"""What the two sides of the live path share: which channel layer carries the notices, the outbox of
the embedded mode (named by a string, like ``AUTH_USER_MODEL``: core imports no app), the message
type, and JSON a browser accepts."""

from __future__ import annotations

import json
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder

#: The outbox of the embedded mode: ``id`` (increasing), ``group``, ``payload`` (JSON), ``created_at``.
OUTBOX_MODEL = "gpus.LiveMessage"
#: How long a publish waits for Redis before it gives up (the page repairs from the database); the
#: hub waits as long for its receiver to stop.
SEND_TIMEOUT_SECONDS = 2.0
MESSAGE_TYPE = "live.message"


def cross_process_layer() -> bool:
    """True when the channel layer reaches other processes (Redis)."""
    return "InMemoryChannelLayer" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]


def outbox_model() -> Any:
    return apps.get_model(OUTBOX_MODEL)


def encode_json(content: Any) -> str:
    """JSON a browser's ``JSON.parse`` accepts (no NaN/Infinity: a stray non-finite float is null)."""
    try:
        return json.dumps(content, allow_nan=False, cls=DjangoJSONEncoder)
    except ValueError:
        return json.dumps(finite(content), allow_nan=False, cls=DjangoJSONEncoder)


def finite(value: Any) -> Any:
    """``value`` with every NaN or ±infinity (in nested dicts and lists too) made ``None``."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value

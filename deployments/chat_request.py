"""What the gateway lets through to ``swift deploy``: a chat request rebuilt from an allow-list.

swift's ``ChatCompletionRequest`` (``swift/infer_engine/protocol.py``) reads local files and fetches
URLs named in a request's media (``images``/``audios``/``videos``/``objects`` and content items), so a
deployment's callers could otherwise read the GPU host's files or reach its network (docs/security.md,
H1). :func:`chat_request_clean` therefore builds a new request from what it understands and checked:

* the keys of :data:`NUMBERS`, :data:`FLAGS` and a few more (``model``, ``messages``, ``stop``,
  ``tools``, ``tool_choice``, ``chat_template_kwargs``); ``user``, ``stream_options`` and a
  ``response_format`` of type ``text`` are accepted and not forwarded (swift ignores them);
  ``max_completion_tokens`` becomes swift's ``max_tokens``. Any other key is a 400 naming it.
* messages with a ``system``/``user``/``assistant``/``tool`` role whose content is a string or a list
  of ``text`` and (in a user message) ``image_url`` items; an image only as a
  ``data:image/…;base64,`` URL of an image no larger than ``FINETUNE_GATEWAY_MAX_IMAGE_KB``.
* numbers that are finite and within bounds (``null`` means swift's default and is not forwarded).

A refusal raises :class:`ChatRequestError` with the OpenAI ``param`` it is about, so garbage is a
400 that names the field, never an error of the model server.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

#: Numeric sampling parameters swift's ``RequestConfig`` reads: (integer?, minimum, maximum).
NUMBERS: dict[str, tuple[bool, float, float]] = {
    "max_tokens": (True, 1, 1_048_576),
    "temperature": (False, 0.0, 10.0),
    "top_p": (False, 0.0, 1.0),
    "top_k": (True, -1, 100_000),
    "min_p": (False, 0.0, 1.0),
    "repetition_penalty": (False, 0.01, 10.0),  # transformers: strictly positive
    "presence_penalty": (False, -2.0, 2.0),
    "frequency_penalty": (False, -2.0, 2.0),
    "length_penalty": (False, -10.0, 10.0),
    "n": (True, 1, 16),
    "num_beams": (True, 1, 16),
    "seed": (True, 0, 2**32 - 1),  # numpy's seed range
    "top_logprobs": (True, 0, 20),
}
#: Boolean parameters swift reads.
FLAGS = ("stream", "logprobs")
#: Accepted, checked and not forwarded: swift ignores them (it reports usage in every streamed chunk).
IGNORED = ("user", "stream_options", "response_format")
#: swift would read or fetch these; media go inside a user message's content, as data: URLs.
MEDIA_KEYS = ("images", "audios", "videos", "objects")
ROLES = ("system", "user", "assistant", "tool")
#: ``chat_template_kwargs`` swift's templates read (anything else goes to the tokenizer's template call).
TEMPLATE_FLAGS = ("enable_thinking", "preserve_thinking")
IMAGE_TYPES = ("png", "jpeg", "jpg", "gif", "webp", "bmp")

MAX_MESSAGES = 4096
MAX_ITEMS = 256  # content items of one message, tools, tool calls
MAX_STOP = 16
MAX_NAME = 200
MAX_DEPTH = 32  # nesting of free-form JSON (tool parameters and arguments)

_DATA_URL = re.compile(r"data:image/([A-Za-z0-9.+-]{1,20});base64,(.*)", re.DOTALL)
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


class ChatRequestError(ValueError):
    """A request the gateway refuses (HTTP 400): ``param`` names the field, the message says why."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value: Any, *, param: str, integer: bool, minimum: float, maximum: float) -> int | float:
    """``value`` as a finite number within ``[minimum, maximum]`` (an integer where ``integer``)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ChatRequestError(f"'{param}' must be a {'whole ' if integer else ''}number.", param=param)
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ChatRequestError(f"'{param}' must be a whole number.", param=param)
            value = int(value)
    else:
        value = float(value)
    if not minimum <= value <= maximum:
        raise ChatRequestError(f"'{param}' must be between {minimum:g} and {maximum:g}.", param=param)
    return value


def _text(value: Any, *, param: str, max_length: int | None = None, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ChatRequestError(f"'{param}' must be a{'' if empty else ' non-empty'} string.", param=param)
    if max_length is not None and len(value) > max_length:
        raise ChatRequestError(f"'{param}' must be at most {max_length} characters.", param=param)
    return value


def _list(value: Any, *, param: str, limit: int, empty: bool = False) -> list[Any]:
    if not isinstance(value, list) or (not empty and not value):
        raise ChatRequestError(f"'{param}' must be a{'' if empty else ' non-empty'} list.", param=param)
    if len(value) > limit:
        raise ChatRequestError(f"'{param}' may hold at most {limit} entries.", param=param)
    return value


def _object(value: Any, *, param: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ChatRequestError(f"'{param}' must be an object.", param=param)
    for key in value:
        if key not in allowed:
            raise ChatRequestError(f"Unrecognized argument supplied: '{param}.{key}'.", param=f"{param}.{key}")
    return value


def _shallow(value: Any, *, param: str) -> Any:
    """Free-form JSON (a tool's parameters, a call's arguments), nested at most :data:`MAX_DEPTH` deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ChatRequestError(f"'{param}' is nested too deeply (at most {MAX_DEPTH} levels).", param=param)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def image_data_url(url: Any, *, param: str, max_bytes: int) -> str:
    """A ``data:image/<type>;base64,<data>`` URL of at most ``max_bytes`` decoded bytes that holds an
    image; any other URL (``http(s)://``, ``file://``, a path) is refused: the model server would
    fetch or read it."""
    if max_bytes <= 0:
        raise ChatRequestError("Images are not accepted by this platform (FINETUNE_GATEWAY_MAX_IMAGE_KB is 0).",
                               param=param, code="images_not_accepted")
    if not isinstance(url, str):
        raise ChatRequestError(f"'{param}' must be a string.", param=param)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ChatRequestError(
            "An image must be sent inline as a 'data:image/<png|jpeg|gif|webp|bmp>;base64,…' URL: the model "
            "server never fetches a URL or reads a file.", param=param, code="image_url_not_allowed")
    kind, data = match.group(1).lower(), match.group(2)
    if kind not in IMAGE_TYPES:
        raise ChatRequestError(f"Image type '{kind}' is not accepted (use one of {', '.join(IMAGE_TYPES)}).",
                               param=param)
    if len(data) // 4 * 3 > max_bytes + 2:  # before decoding anything
        raise ChatRequestError(f"An image may be at most {max_bytes // 1024} KiB.", param=param, code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatRequestError(f"'{param}' is not valid base64.", param=param) from None
    if len(raw) > max_bytes:
        raise ChatRequestError(f"An image may be at most {max_bytes // 1024} KiB.", param=param, code="image_too_large")
    if not (raw.startswith(_MAGIC) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")):
        raise ChatRequestError(f"'{param}' does not hold a PNG, JPEG, GIF, WebP or BMP image.", param=param)
    return url


def _content_items(items: list[Any], *, param: str, images: bool, max_image_bytes: int) -> list[dict[str, Any]]:
    clean = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ChatRequestError(f"'{where}' must be an object with a 'type'.", param=where)
        kind = item.get("type")
        if kind == "text":
            _object(item, param=where, allowed=("type", "text"))
            clean.append({"type": "text", "text": _text(item.get("text"), param=f"{where}.text")})
        elif kind == "image_url" and images:
            _object(item, param=where, allowed=("type", "image_url"))
            image = item.get("image_url")
            url_param = f"{where}.image_url"
            if isinstance(image, dict):
                _object(image, param=url_param, allowed=("url", "detail"))
                image, url_param = image.get("url"), f"{url_param}.url"
            clean.append({"type": "image_url",
                          "image_url": {"url": image_data_url(image, param=url_param, max_bytes=max_image_bytes)}})
        elif kind == "image_url":
            raise ChatRequestError(f"'{where}': images are accepted in user messages only.", param=f"{where}.type")
        else:
            allowed = "'text' or 'image_url'" if images else "'text'"
            raise ChatRequestError(f"'{where}.type' must be {allowed}; other content (URLs, files, audio, "
                                   "video) is not forwarded to the model server.", param=f"{where}.type",
                                   code="content_type_not_allowed")
    return clean


def _tool_calls(value: Any, *, param: str) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(_list(value, param=param, limit=MAX_ITEMS)):
        where = f"{param}[{i}]"
        _object(call, param=where, allowed=("id", "type", "function", "index"))
        if call.get("type", "function") != "function":
            raise ChatRequestError(f"'{where}.type' must be 'function'.", param=f"{where}.type")
        function = _object(call.get("function"), param=f"{where}.function", allowed=("name", "arguments"))
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise ChatRequestError(f"'{where}.function.arguments' must be a string or an object.",
                                   param=f"{where}.function.arguments")
        clean: dict[str, Any] = {"type": "function", "function": {
            "name": _text(function.get("name"), param=f"{where}.function.name", max_length=MAX_NAME, empty=False),
            "arguments": _shallow(arguments, param=f"{where}.function.arguments"),
        }}
        if "id" in call:
            clean["id"] = _text(call["id"], param=f"{where}.id", max_length=MAX_NAME)
        calls.append(clean)
    return calls


def _message(message: Any, *, param: str, max_image_bytes: int) -> dict[str, Any]:
    _object(message, param=param,
            allowed=("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"))
    role = message.get("role")
    if role not in ROLES:
        raise ChatRequestError(f"'{param}.role' must be one of {', '.join(ROLES)}.", param=f"{param}.role")
    if "name" in message:  # accepted (OpenAI clients send it), not forwarded: swift's templates do not read it
        _text(message["name"], param=f"{param}.name", max_length=MAX_NAME)
    clean: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise ChatRequestError(f"'{param}.tool_calls' is for assistant messages only.", param=f"{param}.tool_calls")
        clean["tool_calls"] = _tool_calls(calls, param=f"{param}.tool_calls")
    if "tool_call_id" in message:
        if role != "tool":
            raise ChatRequestError(f"'{param}.tool_call_id' is for tool messages only.", param=f"{param}.tool_call_id")
        clean["tool_call_id"] = _text(message["tool_call_id"], param=f"{param}.tool_call_id", max_length=MAX_NAME)
    if message.get("reasoning_content") is not None:
        if role != "assistant":
            raise ChatRequestError(f"'{param}.reasoning_content' is for assistant messages only.",
                                   param=f"{param}.reasoning_content")
        clean["reasoning_content"] = _text(message["reasoning_content"], param=f"{param}.reasoning_content")
    content = message.get("content")
    where = f"{param}.content"
    if content is None:
        if not clean.get("tool_calls"):
            raise ChatRequestError(f"'{where}' is required.", param=where)
        clean["content"] = None
    elif isinstance(content, str):
        clean["content"] = content
    elif isinstance(content, list):
        items = _content_items(_list(content, param=where, limit=MAX_ITEMS), param=where, images=role == "user",
                               max_image_bytes=max_image_bytes)
        # Only a user message may carry images; the others' text parts are one string (what OpenAI means).
        clean["content"] = items if role == "user" else "".join(item["text"] for item in items)
    else:
        raise ChatRequestError(f"'{where}' must be a string or a list of content items.", param=where)
    return clean


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(_list(value, param="tools", limit=MAX_ITEMS, empty=True)):
        where = f"tools[{i}]"
        _object(tool, param=where, allowed=("type", "function"))
        if tool.get("type", "function") != "function":
            raise ChatRequestError(f"'{where}.type' must be 'function'.", param=f"{where}.type")
        function = _object(tool.get("function"), param=f"{where}.function",
                           allowed=("name", "description", "parameters", "strict"))
        name = _text(function.get("name"), param=f"{where}.function.name", empty=False)
        if not _TOOL_NAME.fullmatch(name):
            raise ChatRequestError(f"'{where}.function.name' must be 1-64 letters, digits, '_', '.', ':' or '-'.",
                                   param=f"{where}.function.name")
        clean: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            clean["description"] = _text(function["description"], param=f"{where}.function.description")
        if function.get("parameters") is not None:
            if not isinstance(function["parameters"], dict):
                raise ChatRequestError(f"'{where}.function.parameters' must be an object.",
                                       param=f"{where}.function.parameters")
            clean["parameters"] = _shallow(function["parameters"], param=f"{where}.function.parameters")
        if "strict" in function and not isinstance(function["strict"], bool):
            raise ChatRequestError(f"'{where}.function.strict' must be true or false.",
                                   param=f"{where}.function.strict")
        tools.append({"type": "function", "function": clean})
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        _object(value, param="tool_choice", allowed=("type", "function"))
        function = _object(value.get("function"), param="tool_choice.function", allowed=("name",))
        name = function.get("name")
        if not any(tool["function"]["name"] == name for tool in tools or []):
            raise ChatRequestError("'tool_choice.function.name' must name one of 'tools'.",
                                   param="tool_choice.function.name")
        return {"type": "function", "function": {"name": name}}
    raise ChatRequestError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', "
                           "'function': {'name': …}}.", param="tool_choice")


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else _list(value, param="stop", limit=MAX_STOP, empty=True)
    return [_text(s, param=f"stop[{i}]", max_length=1000, empty=False) for i, s in enumerate(stops)]


def _ignored(key: str, value: Any) -> None:
    """Check what is accepted and not forwarded (so a typo in it is still a 400)."""
    if key == "user":
        _text(value, param="user", max_length=256)
    elif key == "stream_options":
        options = _object(value, param="stream_options", allowed=("include_usage", "continuous_usage_stats"))
        for name, flag in options.items():
            if not isinstance(flag, bool):
                raise ChatRequestError(f"'stream_options.{name}' must be true or false.",
                                       param=f"stream_options.{name}")
    elif key == "response_format":
        kind = _object(value, param="response_format", allowed=("type",)).get("type")
        if kind != "text":
            raise ChatRequestError("swift deploy supports only the 'text' response_format.",
                                   param="response_format.type", code="unsupported_parameter")


def chat_request_clean(payload: Any, *, default_model: str, max_image_bytes: int) -> dict[str, Any]:
    """The request to forward to swift, rebuilt from ``payload`` (the parsed JSON body); raises
    :class:`ChatRequestError`. ``model`` defaults to ``default_model`` (the served name)."""
    if not isinstance(payload, dict):
        raise ChatRequestError("The request body must be a JSON object with 'messages'.")
    clean: dict[str, Any] = {}
    for key, value in payload.items():
        if key in MEDIA_KEYS:
            raise ChatRequestError(
                f"'{key}' is not accepted: send an image inside a user message's content, as "
                "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,…'}}.",
                param=key, code="media_not_allowed")
        if key in ("messages", "model", "max_completion_tokens", "tools", "tool_choice"):
            continue  # below, in an order that lets them refer to each other
        if key not in NUMBERS and key not in FLAGS and key not in IGNORED and key not in (
                "stop", "chat_template_kwargs"):
            raise ChatRequestError(f"Unrecognized request argument supplied: '{key}' (the gateway forwards only "
                                   "what swift deploy understands).", param=key, code="unknown_parameter")
        if value is None:
            continue  # swift's default
        if key in NUMBERS:
            integer, low, high = NUMBERS[key]
            clean[key] = number(value, param=key, integer=integer, minimum=low, maximum=high)
        elif key in FLAGS:
            if not isinstance(value, bool):
                raise ChatRequestError(f"'{key}' must be true or false.", param=key)
            clean[key] = value
        elif key == "stop":
            clean["stop"] = _stop(value)
        elif key == "chat_template_kwargs":
            options = _object(value, param=key, allowed=TEMPLATE_FLAGS)
            for name, flag in options.items():
                if not isinstance(flag, bool):
                    raise ChatRequestError(f"'{key}.{name}' must be true or false.", param=f"{key}.{name}")
            clean[key] = dict(options)
        else:
            _ignored(key, value)

    model = payload.get("model")
    clean["model"] = default_model if model is None else _text(model, param="model", max_length=MAX_NAME, empty=False)
    if payload.get("max_completion_tokens") is not None:
        # The newer OpenAI name of swift's max_tokens.
        integer, low, high = NUMBERS["max_tokens"]
        tokens = number(payload["max_completion_tokens"], param="max_completion_tokens", integer=integer,
                        minimum=low, maximum=high)
        if clean.setdefault("max_tokens", tokens) != tokens:
            raise ChatRequestError("'max_tokens' and 'max_completion_tokens' differ; give one of them.",
                                   param="max_completion_tokens")
    messages = _list(payload.get("messages"), param="messages", limit=MAX_MESSAGES)
    clean["messages"] = [_message(m, param=f"messages[{i}]", max_image_bytes=max_image_bytes)
                         for i, m in enumerate(messages)]
    tools = _tools(payload["tools"]) if payload.get("tools") is not None else None
    if tools:  # an empty list means none (some clients always send the key)
        clean["tools"] = tools
    if payload.get("tool_choice") is not None:
        clean["tool_choice"] = _tool_choice(payload["tool_choice"], tools)
    return clean

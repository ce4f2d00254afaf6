"""Shared helpers of the security tests: Alice's world of objects (a task with a checkpoint and a
log, a dataset, an export, a deployment, an API token, a GPU), Bob who owns nothing, the URL
configuration walked into concrete routes, a fingerprint of Alice's objects that a test compares
before and after Bob's requests, and the corpus of hostile values with the rules that say what each
field must do with them (:class:`Probe`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.forms.models import model_to_dict
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.urls.resolvers import RoutePattern

from accounts.models import ApiToken
from accounts.services import api_token_create
from deployments.models import Deployment, DeploymentSource, DeploymentStatus
from gpus.models import Gpu, Lane, Run, RunKind, RunStatus
from tasks import services as task_services
from tasks.models import Dataset, ExportStatus, FinetuningTask, TaskExport, TaskLogLine, TaskStatus
from tasks.paths import task_dir
from tests.conftest import announce_host

#: Every name of Alice's objects contains it; no answer to Bob or to an anonymous client may.
MARKER = "alice-private"


@dataclass
class World:
    """Alice's objects (one of each kind a URL can name) and the clients of Alice and Bob."""

    alice: User
    bob: User
    task: FinetuningTask
    dataset: Dataset
    export: TaskExport
    deployment: Deployment
    token: ApiToken
    gpu: Gpu
    alice_key: str  # Alice's raw API token (the gateway takes only tokens)
    bob_key: str
    checkpoint: Path
    files: list[Path] = field(default_factory=list)

    def client(self, user: User | None) -> Client:
        """A page/API client signed in as ``user``; a server error comes back as a 500 answer (the
        matrix lists every one) rather than as an exception."""
        client = Client(raise_request_exception=False)
        if user is not None:
            client.force_login(user)
        return client


def _finished_task(owner: User, dataset: Dataset) -> tuple[FinetuningTask, Path]:
    """A completed LoRA task with one checkpoint, a merged copy, a log file and log lines."""
    task = FinetuningTask.objects.create(
        owner=owner, name=f"{MARKER}-task", base_model="Qwen/Qwen2.5-0.5B-Instruct",
        model_path="Qwen/Qwen2.5-0.5B-Instruct", datasets=[dataset.pk], status=TaskStatus.COMPLETED,
        training_args={"max_steps": 6, "system": f"{MARKER} system prompt"}, gpu_config={"cpu": True},
    )
    folder = task_dir(owner.pk, task.pk)
    output = folder / "output"
    checkpoint = output / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "args.json").write_text(json.dumps({"model": "/models/tiny-qwen2"}))
    merged = output / "checkpoint-6-merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    log = folder / "train.log"
    log.write_text(f"{MARKER} log line\n")
    run = Run.objects.create(kind=RunKind.TRAIN, subject_id=task.pk, owner=owner, label=f"#{task.pk}",
                             lane=Lane.TRAIN, status=RunStatus.SUCCEEDED, gpu_config={"cpu": True},
                             log_file_path=str(log))
    task.run = run
    task.output_path, task.last_checkpoint, task.log_file_path = str(output), str(checkpoint), str(log)
    task.save(update_fields=["run", "output_path", "last_checkpoint", "log_file_path"])
    TaskLogLine.objects.create(task=task, seq=1, text=f"{MARKER} log line", created_at=task.created_at)
    return task, checkpoint


@pytest.fixture
def world(alice: User, bob: User, data_files: dict[str, Path]) -> World:
    announce_host(cpu=1)
    gpu_host = announce_host(name="security-gpu-host", spec="1x24")
    dataset = task_services.dataset_create(
        owner=alice, upload=SimpleUploadedFile(f"{MARKER}.jsonl", data_files["sft_messages"].read_bytes()),
        name=f"{MARKER}-dataset",
    )
    task, checkpoint = _finished_task(alice, dataset)
    export = TaskExport.objects.create(task=task, checkpoint=str(checkpoint), step=6, status=ExportStatus.COMPLETED,
                                       output_path=str(checkpoint.parent / "checkpoint-6-merged"))
    deployment = Deployment.objects.create(
        owner=alice, name=f"{MARKER}-deployment", status=DeploymentStatus.STOPPED, task=task,
        source=DeploymentSource.CHECKPOINT, model_path=str(checkpoint), served_model_name=f"{MARKER}-model",
    )
    token, alice_key = api_token_create(user=alice, name=f"{MARKER}-token")
    _, bob_key = api_token_create(user=bob, name="bob's")
    return World(
        alice=alice, bob=bob, task=task, dataset=dataset, export=export, deployment=deployment, token=token,
        gpu=Gpu.objects.filter(host=gpu_host).first(), alice_key=alice_key, bob_key=bob_key, checkpoint=checkpoint,
        files=[Path(dataset.path), checkpoint, checkpoint.parent / "checkpoint-6-merged", Path(task.log_file_path)],
    )


def fingerprint(world: World) -> dict[str, Any]:
    """Every row of Alice's (and the GPU, which only staff may change), plus her files: what no
    request of another user may change."""
    alice = world.alice
    rows: dict[str, Any] = {"user": model_to_dict(User.objects.get(pk=alice.pk))}
    for label, queryset in (
        ("tasks", FinetuningTask.objects.filter(owner=alice)),
        ("datasets", Dataset.objects.filter(owner=alice)),
        ("exports", TaskExport.objects.filter(task__owner=alice)),
        ("deployments", Deployment.objects.filter(owner=alice)),
        ("tokens", ApiToken.objects.filter(user=alice)),
        ("runs", Run.objects.filter(owner=alice)),
        ("gpus", Gpu.objects.all()),
    ):
        rows[label] = sorted((model_to_dict(row) for row in queryset), key=lambda r: r["id"])
    rows["files"] = {str(path): path.exists() for path in world.files}
    return rows


# --- the URL configuration as concrete routes ---------------------------------------------------
@dataclass(frozen=True)
class HttpRoute:
    """One URL pattern of the whole configuration: its namespaces, name and the pieces of its path
    (one pattern per level of ``include``)."""

    pieces: tuple[Any, ...]
    name: str | None
    namespace: str
    callback: Any

    @property
    def label(self) -> str:
        return f"{self.namespace + ':' if self.namespace else ''}{self.name or '<unnamed>'} {self.template}"

    @property
    def template(self) -> str:
        return "/" + "".join(str(piece) for piece in self.pieces)

    @property
    def kwargs(self) -> set[str]:
        names: set[str] = set()
        for piece in self.pieces:
            names |= set(piece.regex.groupindex)
        return names

    def url(self, values: dict[str, Any]) -> str:
        """The path with every parameter filled from ``values``."""
        return "/" + "".join(_fill(piece, values) for piece in self.pieces)

    def shadowed(self, values: dict[str, Any]) -> bool:
        """True when the filled path resolves to an earlier pattern (this one is unreachable)."""
        match = resolve(self.url(values))
        return match.func is not self.callback and match.route != "".join(str(p) for p in self.pieces)


def _fill(piece: Any, values: dict[str, Any]) -> str:
    if isinstance(piece, RoutePattern):
        route = str(piece._route)
        return re.sub(r"<(?:(\w+):)?(\w+)>", lambda m: str(values[m.group(2)] if m.group(1) != "drf_format_suffix"
                                                          else "." + values[m.group(2)]), route)
    regex = piece.regex.pattern
    out, i = "", 0
    while i < len(regex):
        group = re.match(r"\(\?P<(\w+)>", regex[i:])
        if group:
            depth, j = 0, i
            while True:  # skip to the group's closing parenthesis
                if regex[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(regex[j], 0)
                if depth == 0:
                    break
                j += 1
            out += str(values[group.group(1)])
            i = j + 1
            continue
        out += regex[i]
        i += 1
    return out.lstrip("^").replace("$", "").replace("/?", "/").replace("\\.", ".")


def http_routes() -> list[HttpRoute]:
    """Every URL pattern reachable from the root URL configuration, DRF routers and admin included."""

    def walk(patterns: list[Any], pieces: tuple[Any, ...], namespace: str) -> Iterator[HttpRoute]:
        for entry in patterns:
            if isinstance(entry, URLResolver):
                inner = ":".join(filter(None, [namespace, entry.namespace]))
                yield from walk(entry.url_patterns, (*pieces, entry.pattern), inner)
            elif isinstance(entry, URLPattern):
                yield HttpRoute(pieces=(*pieces, entry.pattern), name=entry.name, namespace=namespace,
                                callback=entry.callback)

    return list(walk(get_resolver().url_patterns, (), ""))


def admin_value(route: HttpRoute, name: str) -> str:
    """A value for a parameter of an admin URL (any value: a non-staff user never gets past the
    admin's login check)."""
    if name == "app_label":
        regex = next(piece.regex.pattern for piece in route.pieces if "app_label" in piece.regex.groupindex)
        return re.search(r"\(\?P<app_label>([A-Za-z0-9_]+)", regex).group(1)
    return {"url": "nothing-here/"}.get(name, "1")


def errors_mention(body: Any, names: str | tuple[str, ...]) -> bool:
    """True when an error body names one of ``names`` as a key, anywhere in it (``{"training_args":
    {"system": [...]}}`` names both)."""
    names = (names,) if isinstance(names, str) else names
    if isinstance(body, dict):
        return any(name in body for name in names) or any(errors_mention(value, names) for value in body.values())
    if isinstance(body, list):
        return any(errors_mention(value, names) for value in body)
    return False


# --- hostile values (test_malicious_values) --------------------------------------------------------------
class Raw(str):
    """A JSON token written into the body as it is (``NaN``, ``Infinity``, ``1e999``)."""


CORPUS: dict[str, Any] = {
    "dotdot": "../../etc/passwd",
    "absolute": "/etc/passwd",
    "root": "/",
    "home": "~/.ssh/id_rsa",
    "windows": "C:\\Windows\\win.ini",
    "file-url": "file:///etc/passwd",
    "symlink-name": "last-checkpoint",
    "nul": "a\x00b",
    "newline": "a\nb",
    "crlf": "a\r\nb",
    "dash": "-rf",
    "flag": "--output_dir=/x",
    "blank": " ",
    "empty": "",
    "huge-int": 10**30,
    "minus-one": -1,
    "zero": 0,
    "float": 1.5,
    "true": True,
    "null": None,
    "json-nan": Raw("NaN"),
    "json-infinity": Raw("-Infinity"),
    "json-1e999": Raw("1e999"),
    "text-nan": "nan",
    "text-inf": "-inf",
    "rtl-override": "\u202etxt.exe",
    "emoji": "\U0001f999\U0001f525",
    "fullwidth": "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",
    "fullwidth-path": "\uff0e\uff0e\uff0f\uff0e\uff0e\uff0fetc",
    "10kb": "x" * 10240,
    "list": ["a"],
    "empty-list": [],
    "dict": {"a": 1},
    "nested": [[{"x": []}]],
    "html": "<script>alert(1)</script>",
    "shell": "$(id);`id`|id",
    "format": "%s%n{0}{{7*7}}",
    "sql": "' OR 1=1 --",
    "superscript-two": "\u00b2",  # str.isdigit() is true, int() refuses it
}

_SENTINEL = "__raw_json_value__"
_FLAG = re.compile(r"--[a-z][a-z0-9_]*")


# --- rules ----------------------------------------------------------------------------------------------
Rule = Callable[[Any], Any]


def refuse(value: Any) -> str:
    return "refuse"


def text(*, required: bool, max_length: int | None, strip: bool = True, numbers: str = "either") -> Rule:
    """Free text: any string without NUL within the length is stored (stripped, as the API does);
    anything else is refused. ``numbers``: what a JSON number gets (DRF's CharField turns it into
    its text; "either")."""

    def rule(value: Any) -> Any:
        if isinstance(value, Raw):
            return "refuse" if value in ("NaN", "-Infinity") else numbers
        if value is None:
            return "refuse" if required else "either"
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            return "refuse"
        if isinstance(value, (int, float)):
            return numbers
        if "\x00" in value:
            return "refuse"
        stored = value.strip() if strip else value
        if (required and not stored) or (max_length is not None and len(stored) > max_length):
            return "refuse"
        return ("store", stored)

    return rule


def except_for(*accepted: str) -> Rule:
    """Refuse every corpus value but the named ones (a default or a valid value), which may pass."""
    allowed = [CORPUS[label] for label in accepted]

    def rule(value: Any) -> str:
        return "either" if any(value is a or (type(value) is type(a) and value == a) for a in allowed) else "refuse"

    return rule


def system_prompt(value: Any) -> Any:
    """``training_args.system`` / ``deploy_args.system``: text kept exactly, refused when it starts
    with '-', holds NUL, is longer than 4000 or ends in .txt (swift would open it, review M1)."""
    if value is None:
        return "either"  # a null argument is dropped
    if not isinstance(value, str) or isinstance(value, Raw):
        return "refuse"
    if value.startswith("-") or "\x00" in value or len(value) > 4000 or value.strip().lower().endswith(".txt"):
        return "refuse"
    return ("store", value)


def module_names(value: Any) -> Any:
    """``training_args.target_modules``: module names (a list, or words of a string), each letters,
    digits, '_', '.', '-' and not starting with '-'; they are matched against the model's modules,
    never opened."""
    if value is None:
        return "either"
    items = value.split() if isinstance(value, str) and not isinstance(value, Raw) else value
    if not isinstance(items, list) or not items or len(items) > 64:
        return "refuse"
    ok = all(isinstance(item, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", item) for item in items)
    return "either" if ok else "refuse"


def registry_name(value: Any) -> Any:
    """``model_type`` / ``template``: a key of swift's registries, so letters, digits, '_', '.', '-'
    starting with a letter or digit, at most 100 characters."""
    if value is None:
        return "either"
    if not isinstance(value, str) or isinstance(value, Raw):
        return "refuse"
    return ("store", value) if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", value) else "refuse"


def argument_text(value: Any) -> Any:
    """``model_name`` / ``model_author``: text swift substitutes into samples, never opens; kept
    exactly unless it starts with '-', holds NUL or passes 200 characters."""
    if value is None:
        return "either"
    if not isinstance(value, str) or isinstance(value, Raw):
        return "refuse"
    return "refuse" if value.startswith("-") or "\x00" in value or len(value) > 200 else ("store", value)


# --- requests -------------------------------------------------------------------------------------------
def put_value(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``body`` with ``value`` at ``path`` (a Raw value as a sentinel, replaced in the text)."""
    out = json.loads(json.dumps(body))
    target = out
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = _SENTINEL if isinstance(value, Raw) else value
    return out


def json_text(body: dict[str, Any], value: Any) -> str:
    data = json.dumps(body)
    return data.replace(f'"{_SENTINEL}"', str(value)) if isinstance(value, Raw) else data


def post_json(client: Client, url: str, body: dict[str, Any], value: Any) -> Any:
    return client.post(url, json_text(body, value), content_type="application/json")


def parse_error(response: Any) -> bool:
    return response.status_code == 400 and b"JSON parse error" in response.content


@dataclass
class Probe:
    """Send each corpus value at one field and check the answer against the field's rule."""

    label: str  # how the failure report names the field
    names: tuple[str, ...]  # keys a 400 body may name it by (e.g. training_args, or the seed's trainingArgs)
    rule: Rule
    send: Callable[[Any], Any]
    stored: Callable[[Any], Any] | None = None  # the value kept, from a 2xx answer
    argv: Callable[[Any], list[str]] | None = None  # the swift argv of what a 2xx answer created
    skip: tuple[str, ...] = ()  # corpus entries not sent (a test tries them as good values itself)
    only: tuple[str, ...] | None = None  # send only these corpus entries

    def run(self) -> tuple[list[str], int]:
        failures: list[str] = []
        accepted = 0
        for name, value in CORPUS.items():
            if name in self.skip or (self.only is not None and name not in self.only):
                continue
            response = self.send(value)
            status = response.status_code
            expected = self.rule(value)
            where = f"{self.label} = {name}: {status}"
            body = response_body(response)
            if status >= 500:
                failures.append(f"{where} (server error)")
                continue
            if 200 <= status < 300:
                accepted += 1
                if expected == "refuse":
                    failures.append(f"{where}: accepted, must be refused naming {self.names[0]}")
                elif isinstance(expected, tuple) and self.stored is not None and self.stored(response) != expected[1]:
                    failures.append(f"{where}: stored {self.stored(response)!r}, expected {expected[1]!r}")
                if self.argv is not None:
                    user_text = {v for v in CORPUS.values() if isinstance(v, str)}
                    bad = [a for a in self.argv(response) if a.startswith("-") and (not _FLAG.fullmatch(a) or
                                                                                    a in user_text)]
                    if bad:
                        failures.append(f"{where}: the argv has flag-like user text {bad}")
                continue
            if status == 400:
                if isinstance(expected, tuple):
                    failures.append(f"{where}: refused ({body}), must be accepted and stored")
                elif not (errors_mention(body, self.names) or (isinstance(value, Raw) and parse_error(response))):
                    failures.append(f"{where}: the 400 does not name {self.names[0]}: {body}")
                continue
            failures.append(f"{where}: unexpected status ({str(body)[:200]})")
        return failures, accepted


def response_body(response: Any) -> Any:
    try:
        return response.json()
    except (ValueError, TypeError):
        return response.content[:300]

"""The API schema is a contract: schemathesis generates requests from the OpenAPI schema (what
``/api/schema/`` serves) for every operation, valid ones and invalid ones, sends them to the real
WSGI application and runs every check it has on each answer: no server error; every status code,
content type, header and body documented; schema-valid requests accepted and schema-violating ones
refused; authentication enforced; ``405`` with ``Allow`` for an undeclared method; and the rest of
``schemathesis.checks`` (all are on by default; ``max_response_time`` needs a limit and is the only
one left out).

The seed is fixed and generation derandomized, so CI sends the same requests on every run.

Alice owns one object of each kind (``world``, plus a waiting task and a stopped one with a
checkpoint), and about half of the valid requests that name an object name hers, so the 200 paths
are exercised as well as the 404 ones. Each request runs in a savepoint that is rolled back, so every
request sees the same objects; no job runs (nothing commits, so nothing reaches a worker or swift).

A schema-valid request may still be refused where the answer depends on what the server holds,
which no schema can state (:data:`STATE_DEPENDENT`: a wrong password, a dataset that does not exist,
a task in another state). There a 400 is accepted, but only when none of its messages is one of
DRF's own messages about a field's type, format, bounds or presence: those the schema does express,
so such a 400 to a schema-valid request still fails the run.

The OpenAI-compatible gateway (``/api/deployments/{id}/v1/...``) is not in the schema (plain async
Django views, not DRF), so it is not exercised here; its own tests cover it.

The module prints one line at the end: operations, cases, failures by check.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.serializers.json import DjangoJSONEncoder
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck
from rest_framework import fields as drf_fields
from rest_framework import serializers as drf_serializers
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import RejectedPositiveData

import finetune_platform.wsgi
from accounts.services import api_token_create
from tasks import services as task_services
from tasks.models import TaskStatus
from tests.security.conftest import World, _finished_task

#: The fixed seed of every operation's requests (schemathesis mixes in the operation's label).
SEED = 20251126
#: Requests the fuzzing phase makes per operation (the examples and coverage phases add their own).
MAX_EXAMPLES = 25

_SPEC = json.loads(json.dumps(SchemaGenerator().get_schema(request=None, public=True), cls=DjangoJSONEncoder))
schema = schemathesis.openapi.from_dict(_SPEC)
schema.app = finetune_platform.wsgi.application
schema.config.seed = SEED

#: Operations whose answer to a schema-valid request depends on what the server holds: a 400 naming
#: the field is accepted there (see the module docstring).
STATE_DEPENDENT = {
    "POST /api/auth/token/": "the user name and password must be an account's",
    "POST /api/finetuning/tasks/": "the model, datasets, preset and GPUs named must exist and be allowed here",
    "POST /finetuning/createTask": "the model, datasets, preset and GPUs named must exist and be allowed here",
    "POST /api/finetuning/datasets/": "the file must hold dataset rows (.jsonl, .json or .csv)",
    "POST /api/deployments/": "the task (with a checkpoint) or the model folder must exist",
    "POST /api/finetuning/tasks/{id}/resume/": "a stopped or failed task, and a checkpoint it has",
    "POST /api/finetuning/tasks/{id}/export/": "a LoRA task, and a checkpoint it has that is not exported yet",
    "POST /api/finetuning/tasks/{id}/hold/": "a waiting task",
    "POST /api/finetuning/tasks/{id}/priority/": "a waiting task",
    "GET /api/finetuning/exports/{id}/download/": "a completed export",
    "DELETE /api/finetuning/tasks/{id}/outputs/": "a finished task, not deployed, with no export running",
}

#: What the run did, printed as one line at the end of the module.
STATS: dict[str, Any] = {"operations": set(), "cases": 0, "failures": set(), "state_400s": 0}


def _drf_field_messages() -> re.Pattern[str]:
    """DRF's own messages about a value's type, format, bounds or presence (``{max_length}`` and
    the like match anything): the schema states all of these."""
    messages = set()
    for cls in (*vars(drf_fields).values(), drf_serializers.Serializer, drf_serializers.ListSerializer):
        if isinstance(cls, type) and issubclass(cls, drf_fields.Field):
            for klass in cls.__mro__:
                messages.update(str(m) for m in getattr(klass, "default_error_messages", {}).values())
    patterns = sorted(re.sub(r"\\\{\w*\\\}", ".*", re.escape(m)) for m in messages)
    return re.compile("|".join(patterns))


_DRF_MESSAGES = _drf_field_messages()


def _messages(body: Any) -> Iterator[str]:
    if isinstance(body, dict):
        for value in body.values():
            yield from _messages(value)
    elif isinstance(body, list):
        for value in body:
            yield from _messages(value)
    elif isinstance(body, str):
        yield body


def _refused_by_state(case: Any, response: Any, failure: Exception) -> bool:
    """A schema-valid request refused with a 400 on an operation whose answer depends on state,
    naming fields, none of them with a message the schema would have prevented."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return False
    if f"{case.method.upper()} {case.operation.path}" not in STATE_DEPENDENT:
        return False
    try:
        body = json.loads(response.content)
    except ValueError:
        return False
    errors = body.get("errors", {}) if isinstance(body, dict) and "code" in body else body  # the seed's envelope
    messages = list(_messages(errors))
    return bool(messages) and not any(_DRF_MESSAGES.fullmatch(m) for m in messages)


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    failures = Counter(title for _, title in STATS["failures"])
    by_check = ", ".join(f"{title}: {count}" for title, count in sorted(failures.items())) or "none"
    line = (f"schemathesis: {len(STATS['operations'])} operations, {STATS['cases']} cases, "
            f"{sum(failures.values())} failures ({by_check}); {STATS['state_400s']} schema-valid requests "
            "refused by state (400 naming the field)")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


@pytest.fixture
def _plain_wsgi() -> Iterator[None]:
    """Keep the test's database connection open across requests: Django's test client does the
    same, the WSGI transport does not (it would close the connection the test's transaction is on)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def objects(world: World, local_model: Path) -> dict[str, int]:
    """Alice's object for each operation that names one, by the operation's path: the finished
    task for most, a waiting one to hold, prioritise, release or stop, a stopped one with a
    checkpoint (not exported) to resume or export."""
    waiting = task_services.finetuning_task_create(
        owner=world.alice, name="waiting", base_model=str(local_model), datasets=[world.dataset.pk],
        gpu_config={"cpu": True},
    )
    stopped, _ = _finished_task(world.alice, world.dataset)
    stopped.status = TaskStatus.STOPPED
    stopped.save(update_fields=["status"])
    spare, _ = api_token_create(user=world.alice, name="spare")  # revoking it leaves her key working
    tasks = "/api/finetuning/tasks/{id}/"
    return {
        **{f"{tasks}{action}/": waiting.pk for action in ("hold", "priority", "release", "stop", "cancel")},
        **{f"{tasks}{action}/": stopped.pk for action in ("resume", "export")},
        tasks: world.task.pk,
        "/api/auth/tokens/{id}/": spare.pk,
        "/api/deployments/{id}/": world.deployment.pk,
        "/api/finetuning/datasets/{id}/": world.dataset.pk,
        "/api/finetuning/exports/{id}/": world.export.pk,
        "/api/gpus/{id}/": world.gpu.pk,
        "/finetuning/": world.task.pk,
        "dataset": world.dataset.pk,
        "task": world.task.pk,
    }


@pytest.fixture
def operator_key(staff: User) -> str:
    return api_token_create(user=staff, name="operator")[1]


def _aim_at_real_objects(case: Any, objects: dict[str, int]) -> None:
    """Point about half of the valid requests that name an object (by an even id) at Alice's."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    path = case.operation.path
    real = max(((prefix, pk) for prefix, pk in objects.items() if path.startswith(prefix)),
               key=lambda item: len(item[0]), default=(None, None))[1]

    def even(value: Any) -> bool:
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):  # path and query values are text
            value = int(value)
        return isinstance(value, int) and not isinstance(value, bool) and value % 2 == 0

    for params in (case.path_parameters, case.query):
        if real is not None and params and even(params.get("id")):
            params["id"] = str(real) if isinstance(params["id"], str) else real
    body = case.body if isinstance(case.body, dict) else {}
    for key in ("id", "taskId"):
        if real is not None and even(body.get(key)):
            body[key] = real
    if path == "/api/deployments/" and even(body.get("task")):
        body["task"] = objects["task"]
    if path == "/api/finetuning/tasks/" and even(body.get("datasets")):
        body["datasets"] = [objects["dataset"]]


def _staff_only(case: Any) -> bool:
    return case.operation.path.startswith("/api/gpus/{id}/") and case.operation.path.endswith(("/enable/",
                                                                                                "/disable/"))


def _call_and_validate(case: Any, headers: dict[str, str]) -> None:
    """``case.call_and_validate``, where a 400 a state-dependent operation gives to a schema-valid
    request (see :func:`_refused_by_state`) is not a failure of ``positive_data_acceptance``."""
    response = case.call(headers=headers)
    try:
        case.validate_response(response, headers=headers, transport_kwargs={"headers": headers})
    except FailureGroup as group:
        if not any(_refused_by_state(case, response, failure) for failure in group.exceptions):
            raise
        STATS["state_400s"] += 1
        case.validate_response(response, headers=headers, transport_kwargs={"headers": headers},
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                     derandomize=True, database=None, print_blob=False)
@pytest.mark.django_db
def test_every_operation_does_what_the_schema_says(
    case: Any, world: World, objects: dict[str, int], operator_key: str, _plain_wsgi: None
) -> None:
    _aim_at_real_objects(case, objects)
    # The staff-only actions as an operator, so their 200 is exercised (Alice's 403 is in the matrix).
    key = operator_key if _staff_only(case) else world.alice_key
    STATS["operations"].add(case.operation.label)
    STATS["cases"] += 1
    try:
        with transaction.atomic():  # every request sees the same objects
            try:
                _call_and_validate(case, {"Authorization": f"Bearer {key}"})
            finally:
                transaction.set_rollback(True)
    except BaseException as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
        for failure in getattr(exc, "exceptions", [exc]):  # once per operation and kind (Hypothesis replays)
            STATS["failures"].add((case.operation.label, getattr(failure, "title", type(failure).__name__)))
        raise

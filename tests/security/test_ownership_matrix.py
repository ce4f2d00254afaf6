"""The ownership matrix, generated from the URL configuration: every HTTP route (pages, the API and
its DRF routers, the seed-compatible calls under /finetuning/, downloads, the OpenAI gateway, admin)
× GET, POST, PUT, PATCH, DELETE, as Bob (not staff), as an anonymous client and, for a sanity check,
as Alice who owns the objects. Every WebSocket route likewise.

The rules (docs/security.md, "Tests that keep ownership and input handling honest"):

* another user's object is a 404 (405 for a method the route does not have); never 2xx, never a 403
  that tells it exists, never a 5xx; no answer to Bob carries any of Alice's names;
* anonymous: 401/403 on the API, 401 at the gateway and the playground, a redirect to the login page
  for pages, to the admin login for admin;
* staff-only routes (GPU enable/drain, admin): 403/404/405 or the admin login for a non-staff user;
* Bob's requests change nothing of Alice's, even those that name her objects in their body.

A route whose URL has a parameter this file does not know fails
:func:`test_every_route_with_parameters_is_in_the_matrix`: add it to the tables below.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.shortcuts import resolve_url
from django.test import Client

from deployments.models import Deployment
from finetune_platform.asgi import application
from finetune_platform.routing import websocket_urlpatterns
from tasks.models import FinetuningTask
from tests.security.conftest import MARKER, HttpRoute, World, admin_value, fingerprint, http_routes
from tests.web.conftest import ws_headers

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

#: Which of Alice's objects a route's ``pk`` names (the seed-compatible calls take it as ``?id=``).
OWNED: dict[str, str] = {
    # pages
    "task_detail": "task", "task_cards": "task", "task_stop": "task", "task_resume": "task",
    "task_export": "task", "task_delete": "task", "task_outputs_delete": "task",
    "queue_priority": "task", "queue_hold": "task",
    "queue_release": "task", "queue_cancel": "task", "dataset_detail": "dataset", "dataset_delete": "dataset",
    "deployment_detail": "deployment", "deployment_stop": "deployment", "deployment_delete": "deployment",
    "deployment_chat": "deployment", "token_revoke": "token",
    # /api/finetuning/
    "task-detail": "task", "task-cancel": "task", "task-events": "task", "task-export": "task",
    "task-exports": "task", "task-hold": "task", "task-logs": "task", "task-logs-download": "task",
    "task-metrics": "task", "task-priority": "task", "task-release": "task", "task-resume": "task",
    "task-stop": "task", "task-outputs": "task", "dataset-detail": "dataset", "export-detail": "export",
    "export-download": "export",
    # /api/auth/, /api/deployments/ and the gateway
    "api-token-detail": "token", "deployment-detail": "deployment", "deployment-logs": "deployment",
    "deployment-stop": "deployment", "deployment-gateway-models": "deployment",
    "deployment-gateway-chat": "deployment",
    # /finetuning/ (the task id in the query string and the body)
    "seed-get-task": "task", "seed-get-task-log": "task", "seed-stop-task": "task", "seed-delete-task": "task",
}
#: Routes that only staff may use; their object (a GPU) belongs to nobody.
STAFF: dict[str, str] = {"gpu_enable": "gpu", "gpu_disable": "gpu", "gpu-enable": "gpu", "gpu-disable": "gpu"}
#: Objects every signed-in user may read (GPUs: their holders are anonymised for others).
SHARED: dict[str, str] = {"gpu-detail": "gpu"}
#: Routes anyone may use (signing in and out, sign-up, password reset, the language, the schema).
PUBLIC = {
    "login", "logout", "signup", "password_reset", "password_reset_done", "password_reset_confirm",
    "password_reset_complete", "set_language", "api-token-obtain", "schema", "api-docs", "api-redoc",
    "rest_framework:login", "rest_framework:logout", "admin:login", "admin:logout",
}
#: Parameters with a fixed value (no object behind them).
FIXED = {"format": "json", "uidb64": "MQ", "token": "set-password"}
#: Authenticated with an API token only (no session), answering in OpenAI's shape.
GATEWAY = {"deployment-gateway-models", "deployment-gateway-chat"}
#: The deployment page's chat: session-authenticated, but answers 401 (JSON), not a login redirect.
PLAYGROUND = {"deployment_chat"}


def key(route: HttpRoute) -> str:
    return f"{route.namespace}:{route.name}" if route.namespace else (route.name or "")


def kind(route: HttpRoute) -> str:
    if route.namespace == "admin" and key(route) not in PUBLIC:
        return "admin"
    if key(route) in PUBLIC:
        return "public"
    if route.name in GATEWAY:
        return "gateway"
    if route.name in PLAYGROUND:
        return "playground"
    if route.template.startswith(("/api/", "/finetuning/")):
        return "api"
    return "page"


def object_of(route: HttpRoute) -> str | None:
    return OWNED.get(route.name or "") or STAFF.get(route.name or "") or SHARED.get(route.name or "")


def unknown_parameters(route: HttpRoute) -> set[str]:
    if route.namespace == "admin":
        return set()
    params = route.kwargs - set(FIXED)
    if params and object_of(route) is None:
        return params
    return {name for name in params if name != "pk"}


def test_every_route_with_parameters_is_in_the_matrix() -> None:
    """A new route whose URL (or, under /finetuning/, query) names an object must be classified
    here, so the matrix never silently skips it."""
    routes = http_routes()
    assert len(routes) > 100
    unknown = [f"{route.label}: {sorted(unknown_parameters(route))}" for route in routes if unknown_parameters(route)]
    unclassified_seed = [route.label for route in routes
                         if route.template.startswith("/finetuning/") and route.name not in OWNED
                         and route.name not in {"seed-create-task", "seed-get-task-list"}]
    assert not unknown, "routes with parameters the ownership matrix does not know:\n" + "\n".join(unknown)
    assert not unclassified_seed, "seed-compatible calls not in the matrix:\n" + "\n".join(unclassified_seed)
    names = {route.name for route in routes}
    stale = sorted((set(OWNED) | set(STAFF) | set(SHARED) | GATEWAY | PLAYGROUND) - names)
    assert not stale, f"the matrix names routes that no longer exist: {stale}"


# --- HTTP ---------------------------------------------------------------------------------------------
def values_for(route: HttpRoute, world: World) -> dict[str, Any]:
    values: dict[str, Any] = dict(FIXED)
    if route.namespace == "admin":
        return {name: admin_value(route, name) for name in route.kwargs}
    target = object_of(route)
    if target is not None:
        values["pk"] = getattr(world, target).pk
    return values


def json_body(world: World) -> dict[str, Any]:
    """A body naming Alice's objects in every field a create or action call reads."""
    task, dataset = world.task, world.dataset
    return {
        "id": task.pk, "taskId": task.pk, "task": task.pk, "datasets": [dataset.pk], "datasetPath": [dataset.pk],
        "checkpoint": str(world.checkpoint), "model": str(world.checkpoint), "name": "made-by-bob",
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "baseModel": "Qwen/Qwen2.5-0.5B-Instruct", "priority": 9,
        "gpu_config": {"cpu": True}, "gpuConfig": {"cpu": True}, "backend": "transformers", "source": "task",
        "messages": [{"role": "user", "content": "hi"}],
    }


def form_body(world: World) -> dict[str, Any]:
    return {"task": world.task.pk, "datasets": world.dataset.pk, "checkpoint": str(world.checkpoint),
            "model": str(world.checkpoint), "name": "made-by-bob", "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
            "priority": 9, "source": "task", "backend": "transformers", "gpu_mode": "cpu"}


def send(client: Client, route: HttpRoute, method: str, url: str, world: World, bearer: str | None) -> HttpResponse:
    headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
    if route.name and route.name.startswith("seed-"):
        url = f"{url}?{urlencode({'id': world.task.pk})}"
    if method == "GET":
        return client.get(url, headers=headers)
    if kind(route) in ("api", "gateway", "playground"):
        return client.generic(method, url, json.dumps(json_body(world)), content_type="application/json",
                              headers=headers)
    if method == "POST":
        return client.post(url, form_body(world), headers=headers)
    return client.generic(method, url, urlencode(form_body(world)),
                          content_type="application/x-www-form-urlencoded", headers=headers)


def content(response: HttpResponse) -> bytes:
    """The whole body. (The test client closes a streamed response once it is read; closing it again
    would send request_finished with the database connection's closer attached.)"""
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return response.content


def expected_for_bob(route: HttpRoute, method: str) -> set[int] | str:
    """The statuses Bob may get (or "redirect:<prefix>")."""
    category = kind(route)
    if category == "public":
        return "any"
    if category == "admin":
        return "redirect:/admin/login/"
    if route.name in OWNED:
        return {404, 405}
    if route.name in STAFF:
        return {403, 404, 405}
    if route.name in SHARED:
        return {200, 405} if method == "GET" else {403, 405}
    return "any"  # a route with no object: Bob acts on his own (his list, a create of his own)


def expected_for_anonymous(route: HttpRoute) -> set[int] | str:
    category = kind(route)
    if category == "public":
        return "any"
    if category == "admin":
        return "redirect:/admin/login/"
    if category == "api":
        return {401, 403}
    if category in ("gateway", "playground"):
        return {401, 405}
    return f"redirect:{resolve_url(settings.LOGIN_URL)}"


def check(expected: set[int] | str, response: HttpResponse) -> bool:
    if response.status_code >= 500:
        return False
    if expected == "any":
        return True
    if isinstance(expected, str):
        prefix = expected.split(":", 1)[1]
        return response.status_code == 302 and response["Location"].startswith(prefix)
    return response.status_code in expected


def reachable(routes: list[HttpRoute], world: World) -> list[HttpRoute]:
    """The routes a request can reach: DRF's API root of a router mounted at ``""`` (``/api/gpus/``)
    is hidden behind the list route at the same path."""
    hidden = [route for route in routes if route.shadowed(values_for(route, world))]
    assert {route.name for route in hidden} <= {"api-root"}, [route.label for route in hidden]
    return [route for route in routes if route not in hidden]


def run_matrix(world: World, user: User | None, routes: Iterable[HttpRoute], expect: Any,
               bearer: str | None) -> list[str]:
    failures: list[str] = []
    client = world.client(user)
    for route in routes:
        url = route.url(values_for(route, world))
        statuses = set()
        for method in METHODS:
            # Signing out (or in) changes the session: such routes get a client of their own.
            own = world.client(user) if kind(route) == "public" else client
            response = send(own, route, method, url, world, bearer)
            body = content(response)
            statuses.add(response.status_code)
            wanted = expect(route, method) if user is not None else expect(route)
            if response.status_code == 500 and "format" in route.kwargs:
                continue  # a known bug, pinned by test_drf_format_suffix_routes_answer_without_a_server_error
            if not check(wanted, response):
                where = response.get("Location", "")
                failures.append(f"{method} {url} ({route.label}): {response.status_code} {where} "
                                f"{body[:200]!r}; expected {wanted}")
            elif MARKER.encode() in body:
                failures.append(f"{method} {url} ({route.label}): the answer shows Alice's objects: {body[:300]!r}")
        if user is not None and route.name in OWNED and 404 not in statuses and 500 not in statuses:
            failures.append(f"{url} ({route.label}): no method answered 404 ({sorted(statuses)}): is the route tested?")
    return failures


def test_the_ownership_matrix_over_every_http_route(world: World) -> None:
    routes = reachable(http_routes(), world)
    before = fingerprint(world)

    failures = run_matrix(world, world.bob, routes, expected_for_bob, world.bob_key)
    failures += run_matrix(world, None, routes, expected_for_anonymous, None)

    assert fingerprint(world) == before, "a request of Bob's or an anonymous one changed Alice's objects"
    assert not Deployment.objects.filter(owner=world.bob, task__owner=world.alice).exists()
    assert not any(world.dataset.pk in task.datasets for task in FinetuningTask.objects.filter(owner=world.bob))
    assert not failures, f"{len(failures)} answers break the rules:\n" + "\n".join(failures)

    # Not vacuous: Alice reaches every object route the matrix refused to Bob.
    alice = world.client(world.alice)
    reached, refused = 0, []
    for route in routes:
        if object_of(route) is None or route.name in STAFF:
            continue
        url = route.url(values_for(route, world))
        response = send(alice, route, "GET", url, world, world.alice_key)
        content(response)
        if response.status_code == 500 and "format" in route.kwargs:
            continue  # the known bug above
        # The gateway finds the deployment, which is stopped: 503 "not running", not 404.
        allowed = {200, 405} | ({503} if route.name in GATEWAY else set())
        if response.status_code not in allowed:
            refused.append(f"GET {url} ({route.label}): {response.status_code}")
        reached += response.status_code in (200, 503)
    assert not refused, "Alice cannot reach her own objects:\n" + "\n".join(refused)
    assert reached >= 20


def test_no_route_takes_a_format_suffix() -> None:
    """DRF's format-suffix routes (``/api/…/tasks/1/stop.json/``) passed ``format=`` to ``create()`` and
    to ``@action`` methods that take no ``**kwargs``: a 500. The routers add none now."""
    assert [route.label for route in http_routes() if "format" in route.kwargs] == []


def test_bob_cannot_name_alices_objects_in_a_body_either(world: World, local_model: Any) -> None:
    """The objects a create or action call names in its body are looked up among the caller's own:
    Alice's dataset (by id, or by name for the seed's datasetPath), her checkpoint folder (as a
    deployment's model, as a base model, as the checkpoint of Bob's own task) are all refused,
    naming the field."""
    bob = world.client(world.bob)
    own_task = FinetuningTask.objects.create(owner=world.bob, name="bobs", base_model="Qwen/Qwen2.5-0.5B-Instruct",
                                             model_path="Qwen/Qwen2.5-0.5B-Instruct", status="stopped",
                                             output_path=str(world.checkpoint.parent.parent / "not-bobs"))
    checkpoint = str(world.checkpoint)
    task = {"name": "x", "base_model": str(local_model), "gpu_config": {"cpu": True}}
    attempts = [
        ("/api/finetuning/tasks/", {**task, "datasets": [world.dataset.pk]}, "datasets"),
        ("/api/finetuning/tasks/", {**task, "datasets": [world.dataset.pk], "base_model": checkpoint}, "base_model"),
        ("/finetuning/createTask", {"name": "x", "baseModel": str(local_model), "gpuConfig": {"cpu": True},
                                    "datasetPath": [world.dataset.name]}, "datasetPath"),
        ("/finetuning/createTask", {"name": "x", "baseModel": str(local_model), "gpuConfig": {"cpu": True},
                                    "datasetPath": world.dataset.pk}, "datasetPath"),
        ("/api/deployments/", {"name": "x", "model": checkpoint, "gpu_config": {"cpu": True}}, "model"),
        ("/api/deployments/", {"name": "x", "task": world.task.pk, "gpu_config": {"cpu": True}}, "task"),
        ("/api/deployments/", {"name": "x", "task": own_task.pk, "checkpoint": checkpoint,
                               "gpu_config": {"cpu": True}}, "checkpoint"),
        (f"/api/finetuning/tasks/{own_task.pk}/export/", {"checkpoint": checkpoint}, "checkpoint"),
        (f"/api/finetuning/tasks/{own_task.pk}/resume/", {"checkpoint": checkpoint}, "checkpoint"),
    ]
    before = fingerprint(world)
    for url, body, field in attempts:
        response = bob.post(url, json.dumps(body), content_type="application/json")
        data = response.json()
        assert response.status_code == 400, (url, body, response.status_code, data)
        assert field in data.get("errors", data), (url, field, data)
        assert MARKER not in json.dumps(data) or MARKER in json.dumps(body), (url, data)  # an echo is no leak
    assert fingerprint(world) == before
    assert not FinetuningTask.objects.filter(owner=world.bob).exclude(pk=own_task.pk).exists()
    assert not Deployment.objects.filter(owner=world.bob).exists()


def test_staff_reach_the_admin_and_gpu_routes_that_bob_cannot(world: World, staff: User) -> None:
    client = world.client(staff)
    assert client.get("/admin/").status_code == 200
    assert client.get(f"/admin/tasks/finetuningtask/{world.task.pk}/change/").status_code == 200
    assert client.post(f"/api/gpus/{world.gpu.pk}/disable/").status_code == 200


# --- WebSockets ------------------------------------------------------------------------------------
#: What each WebSocket route's URL parameter names.
WS_OBJECTS = {"task_id": "task", "deployment_id": "deployment"}


def ws_routes() -> list[tuple[str, str | None]]:
    """(path template, parameter) of every WebSocket route."""
    routes = []
    for pattern in websocket_urlpatterns:
        params = set(pattern.pattern.regex.groupindex)
        assert params <= set(WS_OBJECTS), f"WebSocket route {pattern.pattern} has unknown parameters {params}"
        routes.append((str(pattern.pattern), next(iter(params), None)))
    return routes


async def connect(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await comm.connect(timeout=5)
    await comm.disconnect()
    return connected, code


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
async def test_every_websocket_route_refuses_others_objects_with_4404_and_anonymous_with_4401(
    alice: User, bob: User
) -> None:
    world = await database_sync_to_async(_ws_world)(alice, bob)
    alice_headers = await database_sync_to_async(ws_headers)(alice)
    bob_headers = await database_sync_to_async(ws_headers)(bob)
    routes = ws_routes()
    assert len(routes) >= 6 and any(param for _, param in routes)
    failures = []
    for template, param in routes:
        path = "/" + (template.replace(f"<int:{param}>", str(world[WS_OBJECTS[param]])) if param else template)
        anonymous = await connect(path, ws_headers(None))
        if anonymous != (False, 4401):
            failures.append(f"{path} anonymous: {anonymous}")
        mine = await connect(path, alice_headers)
        if not mine[0]:
            failures.append(f"{path} Alice (owner): {mine}")
        if param:
            other = await connect(path, bob_headers)
            if other != (False, 4404):
                failures.append(f"{path} Bob: {other}")
    assert not failures, "\n".join(failures)


def _ws_world(alice: User, bob: User) -> dict[str, int]:
    task = FinetuningTask.objects.create(owner=alice, name=f"{MARKER}-task", base_model="Qwen/Qwen2.5-0.5B-Instruct",
                                         model_path="Qwen/Qwen2.5-0.5B-Instruct", status="completed")
    deployment = Deployment.objects.create(owner=alice, name=f"{MARKER}-deployment", status="stopped")
    return {"task": task.pk, "deployment": deployment.pk}

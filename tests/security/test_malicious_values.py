"""A corpus of hostile values sent to every field a user names on the create and update endpoints
(tasks, the seed-compatible createTask, datasets, exports, resumes, priorities, deployments, API
tokens) and to the query parameters of the list and log endpoints.

Each field has a *rule* that encodes the decision for it (docs/security.md, "Tests that keep
ownership and input handling honest"):

* ``refuse``: a 400 whose body names the field (a body the JSON parser cannot read, such as a bare
  ``NaN``, is a 400 "JSON parse error" that cannot name one);
* ``("store", value)``: accepted, and the value stored is exactly ``value`` (free text: a task's name
  may be Arabic, an emoji or ``../../etc/passwd``; it is a label, never a path or an argument);
* ``either``: a refusal naming the field or an acceptance (a default applies, ``0`` is a valid
  priority, …).

Whatever the rule, the answer is never a 5xx, and when a task or deployment is created, the argv its
swift process would get contains no element that starts with ``-`` other than the platform's own
``--flag`` names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.test.client import BOUNDARY

from accounts.models import ApiToken
from deployments.command import RESERVED_DEPLOY_ARGS
from deployments.command import build_argv as deploy_argv
from deployments.models import Deployment
from tasks.command import build_argv as train_argv
from tasks.models import Dataset, FinetuningTask, TaskExport, TaskStatus
from tasks.paths import datasets_dir
from tests.security.conftest import (
    CORPUS,
    Probe,
    Raw,
    Rule,
    World,
    argument_text,
    errors_mention,
    except_for,
    module_names,
    post_json,
    put_value,
    refuse,
    registry_name,
    response_body,
    system_prompt,
    text,
)

#: A multipart body written by hand (the test client's own MULTIPART_CONTENT would encode it again).
FORM_DATA = f"multipart/form-data; boundary={BOUNDARY}"


def run_all(probes: list[Probe], *, known: dict[str, tuple[str, ...]] | None = None) -> None:
    failures: list[str] = []
    for probe in probes:
        probe.skip = (*probe.skip, *(known or {}).get(probe.label, ()))
        failures += probe.run()[0]
    assert not failures, f"{len(failures)} answers break the rules:\n" + "\n".join(failures)


def argv_flags_of_task(settings: Any, tmp_path: Path) -> Callable[[Any], list[str]]:
    settings.FINETUNE_SWIFT_BIN = "swift"

    def build(response: Any) -> list[str]:
        data = response.json()
        pk = data.get("id") or data.get("data", {}).get("id")
        return train_argv(FinetuningTask.objects.get(pk=pk), output_dir=tmp_path / "out")

    return build


# --- task create (the API and the seed-compatible call) ---------------------------------------------------
@pytest.fixture
def task_body(world: World, local_model: Path) -> dict[str, Any]:
    return {"name": "colors", "base_model": str(local_model), "datasets": [world.dataset.pk],
            "gpu_config": {"cpu": True}, "training_args": {"max_steps": 2}}


def task_probes(client: Client, base: dict[str, Any], url: str, names: dict[str, str],
                stored_task: Callable[[Any], Any], argv: Callable[[Any], list[str]], prefix: str) -> list[Probe]:
    def field(path: tuple[str, ...], rule: Rule, *, store: str | None = None) -> Probe:
        send_path = (names.get(path[0], path[0]), *path[1:])

        def send(value: Any) -> Any:
            return post_json(client, url, put_value(base, send_path, value), value)

        def stored(response: Any) -> Any:
            return getattr(stored_task(response), store) if store else None

        return Probe(label=".".join((prefix, *send_path)), names=(path[0], send_path[0]), rule=rule, send=send,
                     stored=stored if store else None, argv=argv)

    def key_probe() -> Probe:
        def send(value: Any) -> Any:
            if not isinstance(value, str) or isinstance(value, Raw):
                value = "x"  # JSON object keys are strings: the other values have no key form
            return post_json(client, url, put_value(base, (names.get("training_args", "training_args"), value), 1),
                             None)

        # No corpus value is an allowed argument name.
        return Probe(label=f"{prefix}.training_args key", names=("training_args", names.get("training_args", "")),
                     rule=refuse, send=send)

    return [
        field(("name",), text(required=True, max_length=200), store="name"),
        field(("description",), text(required=False, max_length=None), store="description"),
        field(("output_name",), text(required=False, max_length=200), store="output_name"),
        field(("base_model",), refuse),
        field(("datasets",), refuse),
        field(("training_args",), except_for("null", "empty")),
        key_probe(),
        field(("training_args", "system"), system_prompt),
        field(("training_args", "max_steps"), except_for("null")),
        field(("training_args", "target_modules"), module_names),
        field(("training_args", "template"), registry_name),
        field(("training_args", "model_type"), registry_name),
        field(("training_args", "model_name"), argument_text),
        field(("training_args", "deepspeed"), except_for("null")),
        field(("gpu_config",), except_for("null", "empty")),
        field(("gpu_config", "devices"), except_for("null", "empty", "zero", "empty-list")),
        field(("gpu_config", "count"), refuse),
        field(("gpu_config", "min_memory_gb"), except_for("null", "float", "huge-int", "json-1e999")),
        field(("priority",), except_for("zero", "null", "empty")),
        field(("task_type",), except_for("null", "empty")),
        field(("train_type",), except_for("null", "empty")),
        field(("preset",), except_for("null", "empty", "blank")),
    ]


@pytest.mark.django_db
def test_task_create_refuses_or_keeps_every_hostile_value(
    world: World, task_body: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    client = world.client(world.alice)
    argv = argv_flags_of_task(settings, tmp_path)
    probes = task_probes(client, task_body, "/api/finetuning/tasks/", {},
                         lambda r: FinetuningTask.objects.get(pk=r.json()["id"]), argv, "tasks")
    probes.append(Probe("tasks.auto_export", ("auto_export",), except_for("zero", "true", "null"),
                        lambda v: post_json(client, "/api/finetuning/tasks/", put_value(task_body, ("auto_export",), v),
                                            v)))
    run_all(probes)


SEED_NAMES = {"base_model": "baseModel", "datasets": "datasetPath", "training_args": "trainingArgs",
              "gpu_config": "gpuConfig", "output_name": "outputPath", "task_type": "taskType",
              "train_type": "trainType"}


def seed_probes(world: World, task_body: dict[str, Any], settings: Any, tmp_path: Path) -> list[Probe]:
    client = world.client(world.alice)
    seed_body = {SEED_NAMES.get(key, key): value for key, value in task_body.items()}
    argv = argv_flags_of_task(settings, tmp_path)
    probes = task_probes(client, seed_body, "/finetuning/createTask", SEED_NAMES,
                         lambda r: FinetuningTask.objects.get(pk=r.json()["data"]["id"]), argv, "createTask")
    # The seed's datasetPath also takes dataset names; its description is kept as sent (the API's
    # serializer strips it); its blank values mean "absent".
    for probe in probes:
        if probe.label == "createTask.datasetPath":
            probe.rule = except_for("null")
        if probe.label == "createTask.description":
            probe.rule = text(required=False, max_length=None, strip=False)
        if probe.label.split(".", 1)[1] in ("taskType", "trainType", "outputPath", "description", "preset"):
            probe.rule = _seed_blank_is_absent(probe.rule)
    return probes


@pytest.mark.django_db
def test_the_seed_create_task_refuses_or_keeps_every_hostile_value(
    world: World, task_body: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    run_all(seed_probes(world, task_body, settings, tmp_path))


def _seed_blank_is_absent(rule: Rule) -> Rule:
    """The seed's calls read ``body.get(x) or default``: a falsy value (0, [], {}, "") is the default."""
    return lambda value: "either" if (not isinstance(value, Raw) and not value and value is not None) else rule(value)


# --- datasets --------------------------------------------------------------------------------------------
def multipart(fields: dict[str, str], filename: str, content: bytes) -> bytes:
    """A multipart body written by hand: the test client would reduce ``filename`` to its basename."""
    lines: list[bytes] = []
    for name, value in fields.items():
        lines += [f"--{BOUNDARY}".encode(), f'Content-Disposition: form-data; name="{name}"'.encode(), b"",
                  value.encode("utf-8", "surrogatepass")]
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    lines += [f"--{BOUNDARY}".encode(),
              f'Content-Disposition: form-data; name="file"; filename="{quoted}"'.encode("utf-8", "surrogatepass"),
              b"Content-Type: application/octet-stream", b"", content, f"--{BOUNDARY}--".encode(), b""]
    return b"\r\n".join(lines)


@pytest.mark.django_db
def test_dataset_upload_keeps_names_as_labels_and_files_inside_the_workspace(
    world: World, data_files: dict[str, Path]
) -> None:
    client = world.client(world.alice)
    content = data_files["sft_messages"].read_bytes()

    def upload(fields: dict[str, Any], filename: str = "colors.jsonl") -> Any:
        fields = {key: str(value) if isinstance(value, Raw) else value for key, value in fields.items()}
        if any(not isinstance(v, str) for v in fields.values()):
            body = json.dumps({**fields})  # a non-text name can only come as JSON (no file then)
            return client.post("/api/finetuning/datasets/", body, content_type="application/json")
        return client.post("/api/finetuning/datasets/", multipart(fields, filename, content),
                           content_type=FORM_DATA)

    def stored(attribute: str) -> Callable[[Any], Any]:
        return lambda response: getattr(Dataset.objects.get(pk=response.json()["id"]), attribute)

    def as_form_text(value: Any) -> Any:
        return str(value) if isinstance(value, Raw) else value  # a form field has no JSON tokens

    def name_rule(value: Any) -> Any:
        verdict = text(required=False, max_length=200)(as_form_text(value))
        if isinstance(verdict, tuple) and not verdict[1]:
            return ("store", "colors")  # a blank name takes the file's stem
        return "refuse" if verdict == "either" and not isinstance(value, str) else verdict

    probes = [
        Probe("datasets.name", ("name", "file"), name_rule, lambda v: upload({"name": v}), stored("name")),
        Probe("datasets.description", ("description", "file"), lambda v: "refuse" if not isinstance(v, str) else
              text(required=False, max_length=None)(as_form_text(v)), lambda v: upload({"description": v}),
              stored("description")),
    ]
    run_all(probes)

    # File names: the stored file is always a server-made name inside the owner's datasets folder.
    failures = []
    for name, value in CORPUS.items():
        if not isinstance(value, str) or isinstance(value, Raw):
            continue
        for filename in (value, f"{value}.jsonl"):
            response = client.post("/api/finetuning/datasets/", multipart({}, filename, content),
                                   content_type=FORM_DATA)
            if response.status_code >= 500:
                failures.append(f"file name {name} {filename[:40]!r}: server error")
            elif response.status_code == 201:
                dataset = Dataset.objects.get(pk=response.json()["id"])
                path = Path(dataset.path)
                inside = path.parent == datasets_dir(world.alice.pk) and path.is_file()
                if not inside or path.name.startswith(("-", ".")):
                    failures.append(f"file name {name}: stored at {path}")
                if "/" in dataset.original_filename or "\x00" in dataset.original_filename:
                    failures.append(f"file name {name}: original name kept as {dataset.original_filename!r}")
            elif response.status_code != 400 or not (errors_mention(response.json(), ("file",)) or str(
                    # a 10 KB file name: Django's multipart parser refuses the part's header itself
                    response.json().get("detail", "")).startswith("Multipart form parse error")):
                failures.append(f"file name {name} {filename[:40]!r}: {response.status_code} {response_body(response)}")
    assert not failures, "\n".join(failures)


# --- checkpoints: export, resume; a task's priority -------------------------------------------------------
def checkpoint_escape(world: World, tmp_path: Path) -> str:
    """``checkpoint-9`` in the task's output folder, a symlink to a checkpoint-like folder elsewhere."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("adapter_config.json", "trainer_state.json"):
        (outside / name).write_text("{}")
    link = Path(world.task.output_path) / "checkpoint-9"
    link.symlink_to(outside, target_is_directory=True)
    return str(link)


@pytest.mark.django_db
def test_export_and_resume_take_only_a_checkpoint_of_the_task(world: World, tmp_path: Path) -> None:
    client = world.client(world.alice)
    TaskExport.objects.filter(pk=world.export.pk).delete()
    FinetuningTask.objects.filter(pk=world.task.pk).update(status=TaskStatus.STOPPED)
    escape = checkpoint_escape(world, tmp_path)
    probes = []
    for action in ("export", "resume"):
        url = f"/api/finetuning/tasks/{world.task.pk}/{action}/"
        # Null and blank mean "the last checkpoint", which would start the export or the resume: the
        # good values are tried last, below.
        probes.append(Probe(f"{action}.checkpoint", ("checkpoint",), refuse,
                            lambda v, url=url: post_json(client, url, put_value({}, ("checkpoint",), v), v),
                            skip=("null", "empty", "blank")))
    run_all(probes)
    for action in ("export", "resume"):
        response = client.post(f"/api/finetuning/tasks/{world.task.pk}/{action}/", {"checkpoint": escape},
                               content_type="application/json")
        assert response.status_code == 400 and "checkpoint" in response.json(), (action, response.content)
    export = client.post(f"/api/finetuning/tasks/{world.task.pk}/export/", {"checkpoint": 6},
                         content_type="application/json")
    assert export.status_code == 201, export.content
    resumed = client.post(f"/api/finetuning/tasks/{world.task.pk}/resume/", {"checkpoint": "checkpoint-6"},
                          content_type="application/json")
    assert resumed.status_code == 200, resumed.content



@pytest.mark.django_db
def test_a_checkpoint_of_unicode_digits_is_refused_not_a_server_error(world: World) -> None:
    """``"²".isdigit()`` is true but ``int("²")`` fails: steps are ASCII digits only."""
    client = world.client(world.alice)
    FinetuningTask.objects.filter(pk=world.task.pk).update(status=TaskStatus.STOPPED)  # resumable
    for action in ("export", "resume"):
        response = client.post(f"/api/finetuning/tasks/{world.task.pk}/{action}/", {"checkpoint": "\u00b2"},
                               content_type="application/json")
        assert response.status_code == 400 and "checkpoint" in response.json(), (action, response.status_code)


@pytest.mark.django_db
def test_priority_takes_only_a_whole_number_from_0_to_10(world: World, task_body: dict[str, Any]) -> None:
    client = world.client(world.alice)
    created = client.post("/api/finetuning/tasks/", task_body, content_type="application/json")
    assert created.status_code == 201, created.content
    url = f"/api/finetuning/tasks/{created.json()['id']}/priority/"
    run_all([Probe("tasks.priority", ("priority",), except_for("zero"),
                   lambda v: post_json(client, url, put_value({}, ("priority",), v), v))])


# --- deployments ------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_deployment_create_refuses_or_keeps_every_hostile_value(world: World, settings: Any, tmp_path: Path) -> None:
    client = world.client(world.alice)
    base = {"name": "chat", "task": world.task.pk, "gpu_config": {"cpu": True}}

    def field(path: tuple[str, ...], rule: Rule, store: str | None = None) -> Probe:
        def stored(response: Any) -> Any:
            return getattr(Deployment.objects.get(pk=response.json()["id"]), store) if store else None

        def send(value: Any) -> Any:
            return post_json(client, "/api/deployments/", put_value(base, path, value), value)

        return Probe(".".join(("deployments", *path)), (path[0],), rule, send, stored if store else None, argv)

    def argv(response: Any) -> list[str]:
        return deploy_argv(Deployment.objects.get(pk=response.json()["id"]), port=8000, api_key="k", gpu_count=0)

    def served(value: Any) -> Any:
        """What clients send as ``model``: 1-100 letters, digits, '_', '.', ':', '-' (blank: made from
        the deployment's name); a number is its text (DRF's CharField)."""
        if isinstance(value, Raw):
            return "refuse" if value in ("NaN", "-Infinity") else "either"
        if value is None or isinstance(value, (bool, list, dict)):
            return "either" if value is None else "refuse"
        text_value = str(value).strip()
        if not text_value:
            return "either"
        return "either" if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}", text_value) else "refuse"

    def key_probe() -> Probe:
        def send(value: Any) -> Any:
            value = value if isinstance(value, str) and not isinstance(value, Raw) else "x"
            return post_json(client, "/api/deployments/", put_value(base, ("deploy_args", value), 1), None)

        return Probe("deployments.deploy_args key", ("deploy_args",), refuse, send)

    settings.FINETUNE_SWIFT_BIN = "swift"
    run_all([
        field(("name",), text(required=True, max_length=200), store="name"),
        field(("task",), refuse),
        field(("checkpoint",), except_for("null", "empty", "blank")),
        field(("model",), except_for("null", "empty", "blank")),
        field(("merged",), except_for("null", "zero", "true")),
        field(("backend",), except_for("null", "empty")),
        field(("served_model_name",), served),
        field(("gpu_config",), except_for("null", "empty")),
        field(("deploy_args",), except_for("null", "empty")),
        key_probe(),
        field(("deploy_args", "system"), system_prompt),
        field(("deploy_args", "temperature"), except_for("null", "zero", "float")),
        field(("deploy_args", "template"), registry_name),
    ])
    for reserved in RESERVED_DEPLOY_ARGS:  # the platform's own flags, adapters among them
        body = put_value(base, ("deploy_args", reserved), "/etc")
        response = post_json(client, "/api/deployments/", body, None)
        assert response.status_code == 400 and reserved in response.json()["deploy_args"], (reserved, response.content)


# --- API tokens -----------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_an_api_token_name_is_a_label(world: World) -> None:
    client = world.client(world.alice)

    def stored(response: Any) -> Any:
        return ApiToken.objects.get(pk=response.json()["id"]).name

    run_all([Probe("tokens.name", ("name",), text(required=True, max_length=100), lambda v: post_json(
        client, "/api/auth/tokens/", put_value({}, ("name",), v), v), stored)])


# --- query parameters -------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_query_parameters_never_cause_a_server_error(world: World) -> None:
    client = world.client(world.alice)
    task = world.task.pk
    targets = [
        ("/api/finetuning/tasks/", ("status", "task_type", "search", "ordering", "page")),
        (f"/api/finetuning/tasks/{task}/logs/", ("after", "limit")),
        ("/api/deployments/", ("status", "task", "search", "ordering", "page")),
        (f"/api/deployments/{world.deployment.pk}/logs/", ("after", "limit")),
        ("/finetuning/getTaskList", ("page", "pageSize", "status", "name")),
        ("/finetuning/getTaskLog", ("id", "after", "limit")),
        ("/finetuning/getTask", ("id",)),
        ("/api/finetuning/datasets/", ("search", "page")),
    ]
    failures = []
    for url, params in targets:
        for param in params:
            for name, value in CORPUS.items():
                if isinstance(value, (list, dict)) or value is None:
                    continue
                query = {param: str(value)}
                if url.endswith("getTaskLog") and param != "id":
                    query["id"] = str(task)
                response = client.get(f"{url}?{urlencode(query)}")
                body = response_body(response)
                if response.status_code >= 500:
                    failures.append(f"GET {url}?{param}={name}: server error")
                elif response.status_code == 400 and not (errors_mention(body, (param, "page", "after", "id")) or (
                        # DRF's search filter refuses NUL with a bare list (its own CharField)
                        param == "search" and body == ["Null characters are not allowed."])):
                    failures.append(f"GET {url}?{param}={name}: the 400 does not name {param}: {body}")
                elif response.status_code not in (200, 400, 404):
                    failures.append(f"GET {url}?{param}={name}: {response.status_code}")
    assert not failures, "\n".join(failures)


@pytest.mark.django_db
def test_a_huge_task_filter_is_refused_not_a_server_error(world: World) -> None:
    """``?task=`` is bounded: 10**30 once overflowed SQLite (a 500)."""
    response = world.client(world.alice).get(f"/api/deployments/?task={10**30}")
    assert response.status_code in (200, 400), response.status_code


@pytest.mark.django_db
def test_a_nul_in_the_seed_list_filter_is_refused_naming_it(world: World) -> None:
    """NUL in ``name`` is a 400 naming it (PostgreSQL refuses NUL in text: it was a 500)."""
    response = world.client(world.alice).get("/finetuning/getTaskList?name=a%00b")
    assert response.status_code == 400 and "name" in response.json()["errors"]

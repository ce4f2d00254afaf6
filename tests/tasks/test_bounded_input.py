"""Bounded input (issue 11, docs/security.md M7, M8, L2, L8): dataset uploads stop at the size limit
while they stream in, .json datasets are read a record at a time, datasets have at most
FINETUNE_MAX_DATASET_COLUMNS fields, the metrics, events and queue reads are paginated, the task page
shows a bounded number of events and checkpoints, getTaskLog is bounded and huge numbers are 400s."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.test import Client, override_settings
from django.test.client import FakePayload
from django.utils import timezone
from rest_framework.test import APIClient

from tasks import selectors, services
from tasks.dataset_formats import DatasetValidationError, validate_dataset_file
from tasks.models import Dataset, FinetuningTask, TaskEvent, TaskLogLine, TaskMetric
from tasks.uploads import DatasetUploadLimit, UploadBodyCap

MB = 1024 * 1024
API_UPLOAD = "/api/finetuning/datasets/"
PAGE_UPLOAD = "/datasets/new/"
DEFAULT_HANDLERS = list(settings.FILE_UPLOAD_HANDLERS)
ARGS = {"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"}


class CountingUploadHandler(FileUploadHandler):
    """Put after the limit: counts the bytes that reach the handlers that store the file."""

    received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


def jsonl_file(size: int, name: str = "big.jsonl") -> SimpleUploadedFile:
    """A valid .jsonl dataset of about ``size`` bytes."""
    row = (json.dumps({"text": "x" * 1000}) + "\n").encode()
    return SimpleUploadedFile(name, row * (size // len(row) + 1))


@pytest.fixture
def body_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many bytes of the request bodies the test client sent were read by the server."""
    read = [0]
    original = FakePayload.read

    def counting(self: FakePayload, *args: Any, **kwargs: Any) -> bytes:
        data = original(self, *args, **kwargs)
        read[0] += len(data)
        return data

    monkeypatch.setattr(FakePayload, "read", counting)
    return lambda: read[0]


@pytest.fixture
def alice_client(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def upload_handlers(response: Any) -> list[Any]:
    return list(response.wsgi_request.upload_handlers)


# --- uploads stop at the limit ---------------------------------------------------------------------
@override_settings(FINETUNE_MAX_DATASET_MB=1)
def test_the_api_refuses_a_dataset_over_the_limit_without_reading_its_body(
    alice_api: APIClient, body_reads: Callable[[], int]
) -> None:
    response = alice_api.post(API_UPLOAD, {"name": "big", "file": jsonl_file(2 * MB)}, format="multipart")
    assert response.status_code == 400
    assert response.json() == {"file": ["the file is larger than 1 MB"]}
    assert body_reads() == 0  # of a 2 MB body: the Content-Length said enough
    assert not Dataset.objects.exists()


@override_settings(FINETUNE_MAX_DATASET_MB=1)
def test_the_page_refuses_a_dataset_over_the_limit_next_to_the_file_input(
    alice_client: Client, body_reads: Callable[[], int]
) -> None:
    response = alice_client.post(PAGE_UPLOAD, {"name": "big", "file": jsonl_file(2 * MB)})
    assert response.status_code == 400
    html = response.content.decode()
    file_field = html[html.index('data-field="file"') :]
    assert file_field.index("the file is larger than 1 MB") < file_field.index('data-field="name"')
    assert "This field is required" not in html
    assert 'value="big"' in html  # the fields in front of the file were read and are kept
    # The fields in front of the file (and the CSRF token) were read, then the parser stopped at the
    # file: at most a couple of 64 KB chunks of a 2 MB body.
    assert body_reads() < 200 * 1024
    assert not Dataset.objects.exists()


@override_settings(
    FINETUNE_MAX_DATASET_MB=1,
    FILE_UPLOAD_HANDLERS=["tests.tasks.test_bounded_input.CountingUploadHandler", *DEFAULT_HANDLERS],
)
@pytest.mark.parametrize("where", ["api", "page"])
def test_a_file_that_passes_the_limit_while_streaming_is_dropped_at_the_limit(
    where: str, alice_api: APIClient, alice_client: Client
) -> None:
    upload = jsonl_file(MB + 20 * 1024)  # the Content-Length is within the limit and the form's allowance
    if where == "api":
        response = alice_api.post(API_UPLOAD, {"file": upload, "name": "big"}, format="multipart")
        assert response.status_code == 400 and response.json() == {"file": ["the file is larger than 1 MB"]}
    else:
        response = alice_client.post(PAGE_UPLOAD, {"file": upload, "name": "big"})
        assert response.status_code == 400 and "the file is larger than 1 MB" in response.content.decode()
        assert 'value="big"' in response.content.decode()  # a field after the file is still read
    limit, counting, *_ = upload_handlers(response)
    assert isinstance(limit, DatasetUploadLimit) and limit.refused
    assert 0 < counting.received <= MB  # no byte past the limit reached the handlers that store it
    assert not Dataset.objects.exists()


@override_settings(FINETUNE_MAX_DATASET_MB=1)
def test_a_file_within_the_limit_is_still_uploaded_on_the_page_and_by_the_api(
    alice_api: APIClient, alice_client: Client
) -> None:
    response = alice_api.post(API_UPLOAD, {"file": jsonl_file(900 * 1024, "a.jsonl")}, format="multipart")
    assert response.status_code == 201, response.content
    response = alice_client.post(PAGE_UPLOAD, {"file": jsonl_file(900 * 1024, "b.jsonl"), "name": "b"})
    assert response.status_code == 302
    assert Dataset.objects.count() == 2


def test_the_upload_page_still_checks_the_csrf_token(alice: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    page = client.get(PAGE_UPLOAD)
    token = page.context["csrf_token"]
    upload = jsonl_file(10 * 1024, "small.jsonl")
    assert client.post(PAGE_UPLOAD, {"file": upload}).status_code == 403
    upload.seek(0)
    response = client.post(PAGE_UPLOAD, {"csrfmiddlewaretoken": str(token), "file": upload})
    assert response.status_code == 302 and Dataset.objects.filter(owner=alice).count() == 1


class FakeAsgi:
    """What the ASGI cap passes on, what it reads of the body and what it answers."""

    def __init__(self) -> None:
        self.passed_on = False
        self.received = 0
        self.sent: list[dict[str, Any]] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.passed_on = True

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def post(self, path: str, length: int | None) -> None:
        headers = [(b"content-type", b"multipart/form-data; boundary=x")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        await UploadBodyCap(self.app)(scope, self.receive, self.send)


@override_settings(FINETUNE_MAX_DATASET_MB=1)
@pytest.mark.parametrize(("path", "content_type"), [(API_UPLOAD, b"application/json"), (PAGE_UPLOAD, b"text/html")])
async def test_under_daphne_an_upload_over_the_limit_is_answered_before_its_body_is_received(
    path: str, content_type: bytes
) -> None:
    fake = FakeAsgi()
    await fake.post(path, 2 * MB)
    assert not fake.passed_on and fake.received == 0  # Django's ASGI handler would have stored it all
    start, body = fake.sent
    assert start["status"] == 400 and dict(start["headers"])[b"content-type"].startswith(content_type)
    assert b"the file is larger than 1 MB" in body["body"]
    if path == API_UPLOAD:
        assert json.loads(body["body"]) == {"file": ["the file is larger than 1 MB"]}

    chunked = FakeAsgi()
    await chunked.post(path, None)
    assert not chunked.passed_on and chunked.sent[0]["status"] == 411
    within = FakeAsgi()
    await within.post(path, MB)
    assert within.passed_on and not within.sent
    other = FakeAsgi()
    await other.post("/api/finetuning/tasks/", 2 * MB)
    assert other.passed_on  # only the dataset uploads are capped here


# --- .json is streamed --------------------------------------------------------------------------------
def test_a_json_array_is_read_a_record_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    row = {"messages": [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "yo " * 50}]}
    path.write_text(json.dumps([row] * 20000), encoding="utf-8")
    assert path.stat().st_size > 6 * MB
    tracemalloc.start()
    try:
        info = validate_dataset_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.rows, info.format, info.file_type) == (20000, "messages", "json")
    assert peak < MB  # reading it whole took the file's size several times over


@pytest.mark.parametrize(
    "text",
    [
        '[{"text": "a"}, {"text": "b" "c"}]',
        '[{"text": "a"},\n {"text": "b"},\n]',
        '[{"text": "a"}, {"text": "b"}] trailing',
        '[{"text": "a"}, {"text": "b"}',
        '[\r\n{"text": "a"},\r\n{"text" "b"}]',
        '[{"text": "a"}, {"text": "unterminated}]',
        # the error far from the start and behind records longer than the reader's chunks
        "[" + ",\n".join([json.dumps({"text": "y" * 100_000})] * 30) + ',\n {"text": "b",, "c"}]',
        "[" + ", ".join([json.dumps({"text": "z" * 1000})] * 500) + ', {"text": "b"} {"text": "c"}]',
    ],
)
def test_json_syntax_errors_keep_the_line_and_words_of_pythons_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as whole:
        json.loads(text)
    with pytest.raises(DatasetValidationError) as caught:
        validate_dataset_file(path)
    expected = whole.value
    assert (caught.value.line, caught.value.unit) == (expected.lineno, "line")
    assert caught.value.reason == f"invalid JSON ({expected.msg} at column {expected.colno})"


def test_json_numbers_of_any_size_and_non_object_records(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a", "n": 1.5, "big": 100000000000000000000000}, {"text": "b", "x": 1e400}]')
    assert validate_dataset_file(path).columns == ("big", "n", "text", "x")
    path.write_text('[{"text": "a"}, 2.5]')
    assert str(pytest.raises(DatasetValidationError, validate_dataset_file, path).value) == (
        "row 2: expected a JSON object, got number"
    )
    path.write_text('[{"messages": [{"role": 1.5, "content": "x"}]}]')
    assert "has the unknown role 1.5;" in str(pytest.raises(DatasetValidationError, validate_dataset_file, path).value)


# --- at most FINETUNE_MAX_DATASET_COLUMNS fields -----------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_dataset_with_too_many_fields_is_refused_at_the_row_that_passes_the_cap(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": "a", f"k{i}": "v"} for i in range(6)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        header = ["text", *(f"k{i}" for i in range(6))]
        lines = [",".join(header)] + [",".join(r.get(h, "") for h in header) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    assert validate_dataset_file(path, max_columns=7).rows == 6
    error = pytest.raises(DatasetValidationError, validate_dataset_file, path, max_columns=4).value
    assert error.line == (5 if suffix == ".csv" else 4)  # the 4th row: text + k0..k3 are 5 fields
    assert "more than 4 different fields (columns); a dataset may have at most 4" in error.reason


@override_settings(FINETUNE_MAX_DATASET_COLUMNS=3)
def test_an_upload_with_too_many_fields_is_a_400_naming_the_file(alice_api: APIClient) -> None:
    content = "".join(json.dumps({"text": "a", f"k{i}": 1}) + "\n" for i in range(5)).encode()
    response = alice_api.post(API_UPLOAD, {"file": SimpleUploadedFile("wide.jsonl", content)}, format="multipart")
    assert response.status_code == 400
    assert response.json() == {"file": [
        "line 3: with this row the file has more than 3 different fields (columns); a dataset may have at most 3"
    ]}


# --- paginated metrics, events and queue ------------------------------------------------------------------
def make_task(owner: User, model: Path, name: str = "t") -> FinetuningTask:
    return services.finetuning_task_create(owner=owner, name=name, base_model=str(model),
                                           datasets=["builtin:smoke_sft"], training_args=ARGS,
                                           gpu_config={"cpu": True})


@pytest.fixture
def task(alice: User, local_model: Path) -> FinetuningTask:
    return make_task(alice, local_model)


def test_metrics_come_a_page_at_a_time_after_a_step(alice_api: APIClient, task: FinetuningTask) -> None:
    TaskMetric.objects.bulk_create([TaskMetric(task=task, step=step, loss=1.0 / step) for step in range(1, 2501)])
    FinetuningTask.objects.filter(pk=task.pk).update(metrics={"train_runtime": 12.5})
    url = f"/api/finetuning/tasks/{task.pk}/metrics/"
    first = alice_api.get(url).json()
    assert first["count"] == 2500 and len(first["results"]) == 1000 and first["results"][0]["step"] == 1
    assert first["next"].endswith("page=2") and first["previous"] is None
    assert first["summary"] == {"train_runtime": 12.5}
    assert len(alice_api.get(url + "?page_size=99999").json()["results"]) == 2500  # capped at 5000
    after = alice_api.get(url + "?after=2400").json()
    assert after["count"] == 100 and after["results"][0]["step"] == 2401
    for bad in ("-1", "abc", "99999999999999999999"):
        response = alice_api.get(url + f"?after={bad}")
        assert response.status_code == 400 and "after" in response.json()


def test_events_come_a_page_at_a_time_with_their_ids(alice_api: APIClient, task: FinetuningTask) -> None:
    before = TaskEvent.objects.filter(task=task).count()  # created, and queued or not
    TaskEvent.objects.bulk_create([TaskEvent(task=task, kind="checkpoint", message=f"e{i}") for i in range(250)])
    url = f"/api/finetuning/tasks/{task.pk}/events/"
    page = alice_api.get(url).json()
    assert page["count"] == 250 + before and len(page["results"]) == 100
    assert page["results"][0]["kind"] == "created"
    last_id = page["results"][-1]["id"]
    rest = alice_api.get(url + f"?after={last_id}&page_size=1000").json()
    assert rest["count"] == len(rest["results"]) == 150 + before
    assert rest["results"][-1]["message"] == "e249"
    assert alice_api.get(url + "?after=99999999999999999999").status_code == 400


def test_a_live_page_is_sent_only_the_newest_events_on_connect(task: FinetuningTask) -> None:
    """The task socket's first read (after id 0) is bounded: the page keeps no more than these."""
    TaskEvent.objects.bulk_create(
        [TaskEvent(task=task, kind="checkpoint", message=f"e{i}") for i in range(selectors.LIVE_EVENTS_ON_CONNECT + 50)]
    )
    first = selectors.task_events_after(task=task, after_id=0)
    assert len(first) == selectors.LIVE_EVENTS_ON_CONNECT
    assert [e.pk for e in first] == sorted(e.pk for e in first)
    assert first[-1].message == f"e{selectors.LIVE_EVENTS_ON_CONNECT + 49}"
    TaskEvent.objects.create(task=task, kind="checkpoint", message="later")
    assert [e.message for e in selectors.task_events_after(task=task, after_id=first[-1].pk)] == ["later"]


def test_the_queue_is_paginated_and_computes_only_up_to_the_page_asked_for(
    alice: User, alice_api: APIClient, local_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(25):
        make_task(alice, local_model, name=f"t{i}")
    limits: list[int | None] = []
    original = selectors.queue_entries

    def spy(*, user: Any, limit: int | None = None) -> list[Any]:
        limits.append(limit)
        return original(user=user, limit=limit)

    monkeypatch.setattr(selectors, "queue_entries", spy)
    first = alice_api.get("/api/finetuning/queue/").json()
    assert first["count"] == 25 and [e["position"] for e in first["results"]] == list(range(1, 21))
    second = alice_api.get("/api/finetuning/queue/?page=2").json()
    assert [e["position"] for e in second["results"]] == list(range(21, 26)) and second["next"] is None
    small = alice_api.get("/api/finetuning/queue/?page_size=5&page=2").json()
    assert [e["position"] for e in small["results"]] == list(range(6, 11))
    assert limits == [20, 25, 10]  # never the whole queue for a page in front


# --- the task page shows a bounded number of events and checkpoints ----------------------------------------
@pytest.fixture
def checkpoints(task: FinetuningTask, tmp_path: Path) -> Path:
    """15 saved checkpoints in the task's output folder."""
    output = tmp_path / "output"
    for step in range(1, 16):
        folder = output / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"w" * 1000)
        (folder / "trainer_state.json").write_text("{}")
    FinetuningTask.objects.filter(pk=task.pk).update(output_path=str(output))
    return output


def test_the_task_page_shows_the_latest_events_and_newest_checkpoints_and_links_the_rest(
    alice_client: Client, task: FinetuningTask, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = timezone.now()
    TaskEvent.objects.bulk_create([TaskEvent(task=task, kind="checkpoint", message=f"event-{i}") for i in range(150)])
    for i, event in enumerate(TaskEvent.objects.filter(task=task, message__startswith="event-").order_by("pk")):
        TaskEvent.objects.filter(pk=event.pk).update(created_at=start + timedelta(seconds=i))
    walked: list[Path] = []
    original = selectors.folder_size
    monkeypatch.setattr(selectors, "folder_size", lambda path: walked.append(path) or original(path))

    html = alice_client.get(f"/tasks/{task.pk}/").content.decode()
    assert html.count('class="ev-') == 100 and "event-149" in html and "event-49<" not in html
    total = TaskEvent.objects.filter(task=task).count()
    assert f"The latest 100 of {total} events." in html and f"/api/finetuning/tasks/{task.pk}/events/" in html
    assert 'data-since="' in html
    assert html.count('data-step="') == 10 and 'data-step="15"' in html and 'data-step="5"' not in html
    assert "The newest 10 of 15 checkpoints." in html and "?checkpoints=all#checkpoints" in html
    assert sorted(int(p.name.split("-")[1]) for p in walked) == list(range(6, 16))  # the shown ones only

    walked.clear()
    alice_client.get(f"/tasks/{task.pk}/")
    assert walked == []  # complete checkpoints are not walked again
    everything = alice_client.get(f"/tasks/{task.pk}/?checkpoints=all").content.decode()
    assert everything.count('data-step="') == 15 and "?checkpoints=all" in everything  # the cards' URL too
    assert len(walked) == 5


def test_checkpoint_sizes_in_the_api_are_measured_once(
    alice_api: APIClient, task: FinetuningTask, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[Path] = []
    original = selectors.folder_size
    monkeypatch.setattr(selectors, "folder_size", lambda path: walked.append(path) or original(path))
    detail = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()
    assert len(detail["checkpoints"]) == 15 and all(c["size_bytes"] >= 1002 for c in detail["checkpoints"])
    assert len(walked) == 15
    alice_api.get(f"/api/finetuning/tasks/{task.pk}/")
    assert len(walked) == 15


# --- getTaskLog and the log API are bounded -------------------------------------------------------------
def add_log_lines(task: FinetuningTask, count: int, text: Callable[[int], str] = lambda seq: f"line {seq}") -> None:
    now = timezone.now()
    TaskLogLine.objects.bulk_create(
        [TaskLogLine(task=task, seq=seq, text=text(seq), created_at=now) for seq in range(1, count + 1)]
    )
    FinetuningTask.objects.filter(pk=task.pk).update(last_log_seq=count)


def test_get_task_log_sends_each_line_once_and_at_most_5000(alice_api: APIClient, task: FinetuningTask) -> None:
    add_log_lines(task, 6000)
    data = alice_api.get(f"/finetuning/getTaskLog?id={task.pk}").json()["data"]
    assert set(data) == {"lines", "next", "more", "status"}
    assert len(data["lines"]) == 5000 and data["next"] == 5000 and data["more"] is True
    rest = alice_api.get(f"/finetuning/getTaskLog?id={task.pk}&after=5000&limit=99999").json()["data"]
    assert len(rest["lines"]) == 1000 and rest["next"] == 6000 and rest["more"] is False
    assert len(alice_api.get(f"/finetuning/getTaskLog?id={task.pk}&limit=10").json()["data"]["lines"]) == 10


def test_long_lines_are_cut_at_about_a_megabyte_an_answer(alice_api: APIClient, task: FinetuningTask) -> None:
    add_log_lines(task, 300, lambda seq: f"{seq:08d}" + "x" * 7992)  # 8000 characters, the stored maximum
    for url in (f"/finetuning/getTaskLog?id={task.pk}", f"/api/finetuning/tasks/{task.pk}/logs/?limit=5000"):
        response = alice_api.get(url)
        body = response.json()
        data = body.get("data", body)
        assert len(data["lines"]) == 131 and data["more"] is True and data["next"] == 131  # 131 x 8000 ≤ 1 MiB
        assert len(response.content) < 1.2 * MB
    last = alice_api.get(f"/finetuning/getTaskLog?id={task.pk}&after=262").json()["data"]
    assert len(last["lines"]) == 38 and last["more"] is False


# --- huge numbers are 400s, not 500s --------------------------------------------------------------------
HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("query", "field"),
    [(f"page={HUGE}", "page"), (f"pageSize={HUGE}", "pageSize"), (f"size={HUGE}", "size"), ("page=abc", "page"),
     ("page=" + "9" * 5000, "page")],
)
def test_huge_or_broken_numbers_in_get_task_list_are_400s(alice_api: APIClient, query: str, field: str) -> None:
    response = alice_api.get(f"/finetuning/getTaskList?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == 400 and field in response.json()["errors"]


def test_ordinary_paging_of_get_task_list_still_clamps(alice_api: APIClient, task: FinetuningTask) -> None:
    data = alice_api.get("/finetuning/getTaskList?page=0&pageSize=1000").json()["data"]
    assert (data["page"], data["pageSize"], data["total"]) == (1, 100, 1)
    assert alice_api.get("/finetuning/getTaskList?page=1000000").json()["data"]["list"] == []


def test_huge_numbers_in_get_task_log_and_the_log_api_are_400s_or_404s(
    alice_api: APIClient, task: FinetuningTask
) -> None:
    for query in (f"after={HUGE}", f"limit={HUGE}", "after=x"):
        response = alice_api.get(f"/finetuning/getTaskLog?id={task.pk}&{query}")
        assert response.status_code == 400 and query.split("=")[0] in response.json()["errors"]
    assert alice_api.get(f"/finetuning/getTaskLog?id={HUGE}").status_code == 404
    response = alice_api.get(f"/api/finetuning/tasks/{task.pk}/logs/?after={HUGE}")
    assert response.status_code == 400 and "after" in response.json()

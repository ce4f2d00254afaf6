"""The server-rendered pages: empty states, ownership (404), forms with errors next to the field,
CSRF on every POST, English and Chinese."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from core.swift_cli.training_args import TRAINING_ARGS
from gpus.models import Run, RunStatus
from tasks.forms import TRANSLATABLE_TEXTS
from tasks.models import Dataset, ExportStatus, FinetuningTask, TaskExport, TaskLogLine, TaskStatus
from tasks.presets import all_presets
from tasks.templatetags.task_format import format_duration, format_significant, split_error

PAGES = ["home", "task_list", "task_new", "dataset_list", "dataset_upload", "gpus", "queue", "deployments"]


# --- every page -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_for_an_empty_account(alice_client: Client, name: str) -> None:
    response = alice_client.get(reverse(name))
    assert response.status_code == 200
    assert b"Traceback" not in response.content


def test_empty_states_say_what_to_do_next(alice_client: Client) -> None:
    assert "Create your first task" in alice_client.get("/").content.decode()
    assert "No tasks yet." in alice_client.get("/tasks/").content.decode()
    assert "No datasets yet." in alice_client.get("/datasets/").content.decode()
    # The GPUs, queue and deployments pages have their own empty-state tests.
    for url in ("/gpus/", "/queue/", "/deployments/"):
        assert alice_client.get(url).status_code == 200


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_in_chinese(alice_client: Client, name: str) -> None:
    response = alice_client.get(reverse(name), HTTP_ACCEPT_LANGUAGE="zh-hans,zh;q=0.9")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'lang="zh-hans"' in html
    assert "任务" in html and "退出" in html  # "Tasks", "Log out"


def test_the_chinese_pages_translate_the_empty_states(alice_client: Client) -> None:
    html = alice_client.get("/tasks/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "还没有任务" in html
    html = alice_client.get("/datasets/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "还没有数据集。" in html
    html = alice_client.get("/gpus/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "还没有 worker 上报。" in html
    html = alice_client.get("/queue/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "没有等待中的任务。" in html
    html = alice_client.get("/deployments/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "还没有部署。" in html


def test_the_language_switcher_sets_the_language(alice_client: Client) -> None:
    response = alice_client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/tasks/"})
    assert response.status_code == 302
    assert 'lang="zh-hans"' in alice_client.get("/tasks/").content.decode()


def test_pages_need_a_login(client: Client, db: None) -> None:
    for name in PAGES:
        response = client.get(reverse(name))
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_staff_see_the_admin_link_and_others_do_not(alice_client: Client, staff: User) -> None:
    assert "/admin/" not in alice_client.get("/").content.decode()
    client = Client()
    client.force_login(staff)
    assert "/admin/" in client.get("/").content.decode()


# --- task list and detail -------------------------------------------------------------------------------
def test_the_task_list_filters_searches_and_paginates(
    alice: User, alice_client: Client, make_task: Callable[..., FinetuningTask]
) -> None:
    for i in range(23):
        make_task(alice, name=f"run {i}", status=TaskStatus.COMPLETED if i % 2 else TaskStatus.FAILED)
    make_task(alice, name="special colors", status=TaskStatus.RUNNING, task_type="pt", loss=1.234567)
    page1 = alice_client.get("/tasks/").content.decode()
    assert page1.count("data-task-id=") == 20 and "Page 1 of 2" in page1
    assert alice_client.get("/tasks/?page=2").content.decode().count("data-task-id=") == 4
    running = alice_client.get("/tasks/?status=running").content.decode()
    assert running.count("data-task-id=") == 1 and "special colors" in running and "1.235" in running
    assert alice_client.get("/tasks/?type=pt").content.decode().count("data-task-id=") == 1
    assert alice_client.get("/tasks/?q=special").content.decode().count("data-task-id=") == 1
    assert "No task matches" in alice_client.get("/tasks/?q=zzz").content.decode()


def test_the_detail_page_shows_progress_command_and_outputs(
    alice: User, alice_client: Client, make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task(
        alice,
        progress=45.0,
        current_step=9,
        max_steps=20,
        loss=0.123456,
        learning_rate=5e-05,
        command=["swift", "sft", "--model", "m"],
        output_path="/data/out",
        eta_seconds=3725.0,
    )
    html = alice_client.get(f"/tasks/{task.pk}/").content.decode()
    assert "9 / 20" in html and "45%" in html and "0.1235" in html and "5e-05" in html
    assert "1h 02m" in html and "swift sft --model m" in html and "/data/out" in html
    assert f"/ws/tasks/{task.pk}/" in html and f"/api/finetuning/tasks/{task.pk}/logs/download/" in html
    assert "chart.umd.min.js" in html and "cdn" not in html.lower()


def test_bob_gets_404_on_every_page_of_alices_task(
    alice: User, bob_client: Client, make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task(alice)
    assert bob_client.get(f"/tasks/{task.pk}/").status_code == 404
    assert bob_client.post(f"/tasks/{task.pk}/stop/").status_code == 404
    assert bob_client.post(f"/tasks/{task.pk}/delete/").status_code == 404
    assert "colors" not in bob_client.get("/tasks/").content.decode()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.stop_requested_at is None


def cards_rev(html: str) -> str:
    found = re.search(r'data-cards-rev="([0-9a-f]*)"', html)
    assert found is not None, html[:2000]
    return found.group(1)


def card(html: str, name: str) -> str:
    """The markup of one live card (``data-card="<name>"``) of a page or of the cards fragment."""
    found = re.search(rf'<(section|div)[^>]*data-card="{name}".*?</\1>', html, re.S)
    assert found is not None, f"no {name} card"
    return found.group(0)


def test_the_detail_page_names_uploaded_datasets_and_links_them(
    alice: User, bob: User, alice_client: Client, dataset: Dataset, make_task: Callable[..., FinetuningTask]
) -> None:
    gone = Dataset.objects.create(owner=alice, name="old", original_filename="old.jsonl", path="/nowhere",
                                  file_type="jsonl", format="messages", rows=1, size_bytes=1)
    gone_id = gone.pk
    gone.delete()
    bobs = Dataset.objects.create(owner=bob, name="bobs secret", original_filename="b.jsonl", path="/nowhere",
                                  file_type="jsonl", format="messages", rows=1, size_bytes=1)
    task = make_task(alice, datasets=[dataset.pk, gone_id, bobs.pk, "AI-ModelScope/alpaca-gpt4-data-en#500",
                                      "builtin:smoke_sft"])
    details = card(alice_client.get(f"/tasks/{task.pk}/").content.decode(), "details")
    assert f'<a href="/datasets/{dataset.pk}/" data-dataset-id="{dataset.pk}">colors</a>' in details
    assert f"#{gone_id} (deleted)" in details
    assert "bobs secret" not in details and f"#{bobs.pk} (deleted)" in details  # only the owner's datasets
    assert "<code>AI-ModelScope/alpaca-gpt4-data-en#500</code>" in details
    assert "<code>builtin:smoke_sft</code>" in details
    assert 'Datasets</dt><dd data-field="datasets"><a' in details  # the name, no bare id before it


def test_a_dataset_has_its_own_page_for_its_owner_only(
    alice_client: Client, bob_client: Client, dataset: Dataset
) -> None:
    html = alice_client.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "colors" in html and "Chat messages" in html and "64" in html and "data-confirm=" in html
    assert bob_client.get(f"/datasets/{dataset.pk}/").status_code == 404


def test_the_live_cards_are_owner_only(
    alice: User, bob_client: Client, client: Client, make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task(alice)
    assert bob_client.get(f"/tasks/{task.pk}/cards/").status_code == 404
    assert bob_client.get("/tasks/999999/cards/").status_code == 404
    response = client.get(f"/tasks/{task.pk}/cards/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_the_cards_follow_a_task_to_its_end_with_checkpoints_command_and_exports(
    alice: User, alice_client: Client, make_task: Callable[..., FinetuningTask], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    task = make_task(alice, status=TaskStatus.QUEUED, output_path=str(output), train_type="lora")
    page = alice_client.get(f"/tasks/{task.pk}/").content.decode()
    assert f'data-cards-url="/tasks/{task.pk}/cards/"' in page
    first = alice_client.get(f"/tasks/{task.pk}/cards/")
    assert first.status_code == 200 and "no-store" in first.get("Cache-Control", "")
    html = first.content.decode()
    assert cards_rev(html) == cards_rev(page)  # the page and its fragment agree while nothing changes
    assert "No checkpoint yet" in card(html, "checkpoints") and "Shown once the task starts" in card(html, "command")
    assert 'data-field="error" hidden' in card(html, "alerts")

    # The run: it starts on a host, saves checkpoints and completes.
    for step in (2, 4):
        folder = output / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        (folder / "adapter_config.json").write_text("{}")
    FinetuningTask.objects.filter(pk=task.pk).update(
        status=TaskStatus.COMPLETED, last_checkpoint=str(output / "checkpoint-4"), progress=100.0,
    )
    Run.objects.filter(pk=task.run_id).update(
        status=RunStatus.SUCCEEDED, host="gpu-box-1", command=["swift", "sft", "--model", "m"],
        finished_at=timezone.now(),
    )
    html = alice_client.get(f"/tasks/{task.pk}/cards/").content.decode()
    assert cards_rev(html) != cards_rev(page)
    checkpoints = card(html, "checkpoints")
    assert '<tr data-step="2">' in checkpoints and '<tr data-step="4">' in checkpoints
    assert 'data-action="export"' in checkpoints and "No checkpoint yet" not in checkpoints
    assert '<pre class="command" id="command">swift sft --model m</pre>' in card(html, "command")
    details = card(html, "details")
    assert "gpu-box-1" in details and f"{output}/checkpoint-4" in details
    assert "No export yet" in card(html, "exports")

    # An export's progress changes the revision too (it has no event while it runs).
    export = TaskExport.objects.create(task=task, checkpoint=str(output / "checkpoint-4"), step=4,
                                       output_path=str(output / "checkpoint-4-merged"))
    with_export = alice_client.get(f"/tasks/{task.pk}/cards/").content.decode()
    assert cards_rev(with_export) != cards_rev(html) and f'data-export-id="{export.pk}"' in with_export
    TaskExport.objects.filter(pk=export.pk).update(status=ExportStatus.RUNNING, log_text="merging…")
    running = alice_client.get(f"/tasks/{task.pk}/cards/").content.decode()
    assert cards_rev(running) != cards_rev(with_export) and "merging…" in card(running, "exports")
    # … while a reload renders the same cards (one rendering).
    reloaded = alice_client.get(f"/tasks/{task.pk}/").content.decode()
    assert cards_rev(reloaded) == cards_rev(running)
    assert '<tr data-step="4">' in card(reloaded, "checkpoints") and "merging…" in card(reloaded, "exports")


def test_a_failed_task_shows_the_plain_reason_and_keeps_swifts_last_lines_one_click_away(
    alice: User, alice_client: Client, make_task: Callable[..., FinetuningTask]
) -> None:
    error = ("The GPU ran out of memory. Lower the batch size or max_length, or use QLoRA.\n"
             "swift said: torch.OutOfMemoryError: CUDA out of memory")
    task = make_task(alice, status=TaskStatus.FAILED, error_message=error, last_log_seq=50)
    now = timezone.now()
    TaskLogLine.objects.bulk_create(
        [TaskLogLine(task=task, seq=i, text=f"output line {i}", created_at=now) for i in range(1, 51)]
    )
    for html in (alice_client.get(f"/tasks/{task.pk}/").content.decode(),
                 alice_client.get(f"/tasks/{task.pk}/cards/").content.decode()):
        alerts = card(html, "alerts")
        reason = re.search(r'<p class="error-reason"[^>]*>(.*?)</p>', alerts, re.S)
        assert reason is not None and reason.group(1) == error.splitlines()[0]
        assert 'data-field="error"' in alerts and 'data-field="error" hidden' not in alerts
        tail = re.search(r"<details[^>]*>.*?</details>", alerts, re.S)
        assert tail is not None and "swift's last lines" in tail.group(0)
        assert "swift said: torch.OutOfMemoryError: CUDA out of memory" in tail.group(0)
        assert "output line 11\n" in tail.group(0) and "output line 50" in tail.group(0)
        assert "output line 10\n" not in tail.group(0)


def test_bob_cannot_delete_alices_dataset(bob_client: Client, dataset: Dataset) -> None:
    assert bob_client.post(f"/datasets/{dataset.pk}/delete/").status_code == 404
    assert Dataset.objects.filter(pk=dataset.pk).exists()


def test_stop_and_delete_are_post_only_and_need_the_csrf_token(
    alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    task = make_task(alice, status=TaskStatus.PENDING)
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get(f"/tasks/{task.pk}/stop/").status_code == 405
    assert client.post(f"/tasks/{task.pk}/stop/").status_code == 403
    assert client.post(f"/tasks/{task.pk}/delete/").status_code == 403
    html = client.get(f"/tasks/{task.pk}/").content.decode()
    token = client.cookies["csrftoken"].value
    assert 'name="csrfmiddlewaretoken"' in html and "data-confirm=" in html
    response = client.post(f"/tasks/{task.pk}/stop/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == f"/tasks/{task.pk}/"
    task.refresh_from_db()
    assert task.status == TaskStatus.STOPPED
    response = client.post(f"/tasks/{task.pk}/delete/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == "/tasks/"
    assert not FinetuningTask.objects.filter(pk=task.pk).exists()


# --- new task --------------------------------------------------------------------------------------------
def custom_body(model: Path, dataset: Dataset, **extra: Any) -> dict[str, Any]:
    return {
        "mode": "custom",
        "name": "colors",
        "task_type": "sft",
        "train_type": "lora",
        "base_model": str(model),
        "datasets": [str(dataset.pk)],
        "priority": "5",
        "gpu_mode": "cpu",
        "gpu_count": "1",
        "arg_max_steps": "4",
        "arg_model_type": "qwen2",
        "arg_template": "qwen2_5",
        **extra,
    }


def test_the_new_task_form_lists_datasets_local_models_and_the_parameter_catalogue(
    alice_client: Client, dataset: Dataset, local_model: Path
) -> None:
    html = alice_client.get("/tasks/new/").content.decode()
    assert "colors — Chat messages, 64 rows" in html
    assert f'<option value="{local_model}">' in html
    assert "Advanced parameters" in html and 'name="arg_lora_dropout"' in html
    assert "Peak learning rate." in html and "Default: 0.0001." in html and "Unit: tokens." in html
    for preset in all_presets():
        assert f'id="preset-{preset.name}"' in html


def test_a_task_from_scratch_is_created_and_lands_on_its_page(
    alice_client: Client, dataset: Dataset, local_model: Path
) -> None:
    body = custom_body(
        local_model,
        dataset,
        hub_datasets="AI-ModelScope/alpaca-gpt4-data-en#20\n",
        arg_learning_rate="0.0002",
        arg_gradient_checkpointing="false",
        arg_target_modules="q_proj v_proj",
    )
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 302, response.content.decode()[:3000]
    task = FinetuningTask.objects.get()
    assert response["Location"] == f"/tasks/{task.pk}/"
    assert task.datasets == [dataset.pk, "AI-ModelScope/alpaca-gpt4-data-en#20"]
    assert task.gpu_config == {"cpu": True}
    assert task.training_args["learning_rate"] == 0.0002 and task.training_args["max_steps"] == 4
    assert task.training_args["gradient_checkpointing"] is False
    assert task.training_args["target_modules"] == ["q_proj", "v_proj"]


def test_service_errors_show_next_to_their_field(alice_client: Client, dataset: Dataset, local_model: Path) -> None:
    body = custom_body(
        local_model,
        dataset,
        base_model="/etc",
        arg_learning_rate="5",
        arg_lora_rank="0",
        gpu_mode="devices",
        gpu_devices="0; rm -rf /",
    )
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 400
    form = response.context["form"]
    assert "base_model" in form.errors and "outside" in form.errors["base_model"][0] or form.errors["base_model"]
    assert "at most 1" in form.errors["arg_learning_rate"][0]
    assert "at least 1" in form.errors["arg_lora_rank"][0]
    html = response.content.decode()
    assert 'data-field="arg_learning_rate"' in html and "field-error" in html
    assert FinetuningTask.objects.count() == 0


def test_gpu_errors_show_next_to_the_devices_field(alice_client: Client, dataset: Dataset, local_model: Path) -> None:
    response = alice_client.post(
        "/tasks/new/", custom_body(local_model, dataset, gpu_mode="devices", gpu_devices="0; rm -rf /")
    )
    assert response.status_code == 400
    assert "devices must look like" in response.context["form"].errors["gpu_devices"][0]


def test_a_form_without_datasets_says_so(alice_client: Client, dataset: Dataset, local_model: Path) -> None:
    response = alice_client.post("/tasks/new/", custom_body(local_model, dataset, datasets=[]))
    assert response.status_code == 400 and "datasets" in response.context["form"].errors


def test_the_smoke_preset_needs_only_a_click(alice_client: Client, cpu_host: Any, settings: Any) -> None:
    settings.FINETUNE_SMOKE_MODEL = ""  # nothing configured: the built-in tiny model
    body = {
        "mode": "preset",
        "preset_name": "cpu-smoke",
        "preset-cpu-smoke-preset": "cpu-smoke",
        "preset-cpu-smoke-gpu_mode": "auto",  # the form's default
        "preset-cpu-smoke-output_name": "smoke-v1",
    }
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 302
    task = FinetuningTask.objects.get()
    assert task.preset == "cpu-smoke" and task.output_name == "smoke-v1" and task.gpu_config == {}
    assert task.base_model == "builtin:tiny-qwen2" and task.model_source == "local"


def test_the_seed_preset_needs_a_gpu_choice_and_an_output_name(alice_client: Client, db: None) -> None:
    body = {
        "mode": "preset",
        "preset_name": "qwen2.5-7b-lora",
        "preset-qwen2.5-7b-lora-preset": "qwen2.5-7b-lora",
        "preset-qwen2.5-7b-lora-gpu_mode": "devices",
        "preset-qwen2.5-7b-lora-gpu_devices": "0",
        "preset-qwen2.5-7b-lora-output_name": "llm_test",
    }
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 302
    task = FinetuningTask.objects.get()
    assert task.base_model == "Qwen/Qwen2.5-7B-Instruct" and task.gpu_config == {"devices": "0"}
    assert task.output_name == "llm_test" and task.training_args["lora_rank"] == 8


def test_the_smoke_preset_is_offered_with_no_configuration_and_says_it_is_a_smoke_test(
    alice_client: Client, settings: Any
) -> None:
    settings.FINETUNE_SMOKE_MODEL = ""
    html = alice_client.get("/tasks/new/").content.decode()
    assert "no smoke model configured" not in html
    assert 'name="preset-cpu-smoke-preset"' in html
    assert "Smoke test: check this installation" in html and "The model learns nothing useful." in html
    assert "<code>builtin:tiny-qwen2</code>" in html


def test_a_preset_can_prefill_the_custom_form(alice_client: Client, db: None) -> None:
    response = alice_client.get("/tasks/new/?from_preset=qwen2.5-7b-lora")
    form = response.context["form"]
    assert form["base_model"].value() == "Qwen/Qwen2.5-7B-Instruct"
    assert form["arg_lora_alpha"].value() == 32 and form["arg_target_modules"].value() == "all-linear"
    assert "AI-ModelScope/alpaca-gpt4-data-zh#500" in form["hub_datasets"].value()


# --- datasets --------------------------------------------------------------------------------------------
def test_a_broken_dataset_is_refused_with_the_line_number_next_to_the_file_input(
    alice_client: Client, db: None
) -> None:
    bad = SimpleUploadedFile("bad.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    response = alice_client.post("/datasets/new/", {"file": bad})
    assert response.status_code == 400
    errors = response.context["form"].errors["file"][0]
    assert "line" in errors
    assert 'data-field="file"' in response.content.decode()
    assert Dataset.objects.count() == 0


def test_a_good_dataset_is_listed_with_format_and_rows(alice_client: Client, data_files: dict[str, Path]) -> None:
    with data_files["sft_alpaca"].open("rb") as handle:
        response = alice_client.post("/datasets/new/", {"file": handle, "name": "alpaca colors"})
    assert response.status_code == 302 and response["Location"] == "/datasets/"
    html = alice_client.get("/datasets/").content.decode()
    assert "alpaca colors" in html and "Alpaca (instruction/input/output)" in html and ">64<" in html


def test_deleting_a_dataset_asks_first_and_removes_it(alice_client: Client, dataset: Dataset) -> None:
    assert "data-confirm=" in alice_client.get("/datasets/").content.decode()
    assert alice_client.post(f"/datasets/{dataset.pk}/delete/").status_code == 302
    assert not Dataset.objects.filter(pk=dataset.pk).exists()


# --- formatting and translations ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "–"), (7, "7s"), (95, "1m 35s"), (3725, "1h 02m"), (200000, "2d 07h")]
)
def test_durations_read_like_a_person_wrote_them(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("message", "reason", "detail"),
    [
        ("Could not download x.\nswift said: OSError: boom", "Could not download x.", "swift said: OSError: boom"),
        ("Killed by SIGKILL.\nLast output: step 3", "Killed by SIGKILL.", "Last output: step 3"),
        ("swift exited with code 1: ValueError: bad", "swift exited with code 1: ValueError: bad", ""),
        ("", "", ""),
    ],
)
def test_an_error_splits_into_the_plain_reason_and_what_swift_said(message: str, reason: str, detail: str) -> None:
    assert split_error(message) == (reason, detail)


def test_losses_have_four_significant_digits() -> None:
    assert format_significant(2.345678) == "2.346" and format_significant(0.0001) == "0.0001"
    assert format_significant(None) == "–"


def test_every_training_argument_help_text_is_marked_for_translation() -> None:
    for spec in TRAINING_ARGS.values():
        assert spec.help in TRANSLATABLE_TEXTS, spec.help
    for preset in all_presets():
        assert preset.title in TRANSLATABLE_TEXTS and preset.description in TRANSLATABLE_TEXTS

"""The server-rendered pages: empty states, ownership (404), forms with errors next to the field,
CSRF on every POST, English and Chinese."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from tasks import services
from tasks.forms import TRANSLATABLE_TEXTS
from tasks.models import Dataset, FinetuningTask, TaskStatus
from tasks.presets import all_presets
from tasks.templatetags.task_format import format_duration, format_significant
from tasks.training_args import TRAINING_ARGS

PAGES = ["home", "task_list", "task_new", "dataset_list", "dataset_upload", "gpus", "queue", "deployments"]


@pytest.fixture
def alice_client(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def bob_client(bob: User) -> Client:
    client = Client()
    client.force_login(bob)
    return client


@pytest.fixture
def dataset(alice: User, data_files: dict[str, Path]) -> Dataset:
    content = data_files["sft_messages"].read_bytes()
    return services.dataset_create(owner=alice, upload=SimpleUploadedFile("colors.jsonl", content), name="colors")


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


def test_the_smoke_preset_needs_only_a_click(alice_client: Client, local_model: Path, settings: Any) -> None:
    settings.FINETUNE_SMOKE_MODEL = str(local_model)
    body = {
        "mode": "preset",
        "preset_name": "cpu-smoke",
        "preset-cpu-smoke-preset": "cpu-smoke",
        "preset-cpu-smoke-gpu_mode": "cpu",
        "preset-cpu-smoke-output_name": "smoke-v1",
    }
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 302
    task = FinetuningTask.objects.get()
    assert task.preset == "cpu-smoke" and task.output_name == "smoke-v1" and task.gpu_config == {"cpu": True}


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


def test_an_unavailable_preset_is_explained_not_offered(alice_client: Client, settings: Any) -> None:
    settings.FINETUNE_SMOKE_MODEL = ""
    html = alice_client.get("/tasks/new/").content.decode()
    assert "no smoke model configured" in html
    assert 'name="preset-cpu-smoke-preset"' not in html


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


def test_losses_have_four_significant_digits() -> None:
    assert format_significant(2.345678) == "2.346" and format_significant(0.0001) == "0.0001"
    assert format_significant(None) == "–"


def test_every_training_argument_help_text_is_marked_for_translation() -> None:
    for spec in TRAINING_ARGS.values():
        assert spec.help in TRANSLATABLE_TEXTS, spec.help
    for preset in all_presets():
        assert preset.title in TRANSLATABLE_TEXTS and preset.description in TRANSLATABLE_TEXTS

"""Every form's GPU request defaults to automatic (``{}``: one GPU where the platform has GPUs, else a
CPU slot), so a form posted as it is runs on a laptop without a GPU as well as on a GPU server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.test import Client

from deployments.forms import DeploymentForm
from deployments.models import Deployment
from gpus.models import Reservation
from gpus.scheduler import dispatch as dispatch_pending
from tasks.forms import GpuRequestForm, TaskForm
from tasks.models import Dataset, FinetuningTask, TaskStatus
from tests.conftest import announce_host
from tests.deployments.test_services_and_api import make_task


def posted_as_rendered(form: TaskForm, **fields: Any) -> dict[str, Any]:
    """What a browser posts when the user fills in only ``fields``: the GPU request as rendered."""
    return {"mode": "custom", "priority": "5", "gpu_mode": form["gpu_mode"].value(),
            "gpu_count": form["gpu_count"].value(), "gpu_devices": form["gpu_devices"].value() or "", **fields}


def test_every_gpu_request_on_the_new_task_page_starts_on_automatic(alice_client: Client, settings: Any) -> None:
    settings.FINETUNE_SMOKE_MODEL = ""
    response = alice_client.get("/tasks/new/")
    assert response.context["form"]["gpu_mode"].value() == "auto"
    preset_forms = response.context["preset_forms"]
    assert {p.name for p, _ in preset_forms} == {"qwen2.5-7b-lora", "cpu-smoke"}
    assert all(form["gpu_mode"].value() == "auto" for _, form in preset_forms)
    html = response.content.decode()
    checked = re.findall(r'<input type="radio" name="([^"]*gpu_mode)" value="(\w+)"[^>]*\bchecked>', html)
    assert sorted(checked) == [("gpu_mode", "auto"), ("preset-cpu-smoke-gpu_mode", "auto"),
                               ("preset-qwen2.5-7b-lora-gpu_mode", "auto")]
    assert "Automatic" in html and "Automatic: one GPU where this platform has GPUs, else a CPU slot." in html
    assert "for now ask for a number of GPUs" not in html


def test_the_custom_form_posted_with_its_defaults_runs_on_the_cpu_slot_of_a_host_without_gpus(
    alice_client: Client, cpu_host: Any, dataset: Dataset, local_model: Path
) -> None:
    form = alice_client.get("/tasks/new/").context["form"]
    body = posted_as_rendered(form, name="colors", task_type="sft", train_type="lora", base_model=str(local_model),
                              datasets=[str(dataset.pk)], arg_model_type="qwen2", arg_template="qwen2_5")
    response = alice_client.post("/tasks/new/", body)
    assert response.status_code == 302, response.content.decode()[:2000]
    task = FinetuningTask.objects.get()
    assert task.gpu_config == {}
    assert dispatch_pending() == [task.run_id]
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.host == cpu_host.name
    reservation = Reservation.objects.get(run=task.run_id)
    assert reservation.cpu_slot is not None and reservation.gpu_id is None


def test_the_same_defaults_take_one_gpu_where_the_platform_has_gpus(
    alice_client: Client, dataset: Dataset, local_model: Path
) -> None:
    announce_host("gpu-host-01", "2x80")
    form = alice_client.get("/tasks/new/").context["form"]
    body = posted_as_rendered(form, name="colors", task_type="sft", train_type="lora", base_model=str(local_model),
                              datasets=[str(dataset.pk)], arg_model_type="qwen2", arg_template="qwen2_5")
    assert alice_client.post("/tasks/new/", body).status_code == 302
    task = FinetuningTask.objects.get()
    assert dispatch_pending() == [task.run_id]
    assert Reservation.objects.filter(run=task.run_id, gpu__isnull=False).count() == 1


def test_the_smoke_preset_posted_with_its_defaults_runs_on_a_gpu_host_too(
    alice_client: Client, settings: Any
) -> None:
    # A GPU host offers no CPU slot unless configured to; {"cpu": true} would never run here.
    settings.FINETUNE_SMOKE_MODEL = ""
    announce_host("gpu-host-01", "1x24")
    form = alice_client.get("/tasks/new/").context["preset_forms"][1][1]
    body = {"mode": "preset", "preset_name": "cpu-smoke", "preset-cpu-smoke-preset": "cpu-smoke",
            "preset-cpu-smoke-gpu_mode": form["gpu_mode"].value()}
    assert alice_client.post("/tasks/new/", body).status_code == 302
    task = FinetuningTask.objects.get()
    assert task.gpu_config == {} and dispatch_pending() == [task.run_id]


def test_the_other_modes_are_kept() -> None:
    assert [value for value, _ in GpuRequestForm.base_fields["gpu_mode"].choices] == ["auto", "count", "devices",
                                                                                       "cpu"]
    for config, mode in (({}, "auto"), ({"count": 2}, "count"), ({"devices": "0,1"}, "devices"),
                         ({"cpu": True}, "cpu")):
        initial = GpuRequestForm.initial_for(config)
        assert initial["gpu_mode"] == mode
        form = GpuRequestForm({"gpu_count": "1", **{k: str(v) for k, v in initial.items()}})
        assert form.is_valid(), form.errors
        assert form.gpu_config() == config


def test_the_deployment_form_defaults_to_automatic(alice: User, alice_client: Client, cpu_host: Any) -> None:
    form = DeploymentForm(backends=["transformers"])
    assert form["gpu_mode"].value() == "auto"
    task = make_task(alice, name="colors-lora")
    response = alice_client.post("/deployments/", {"name": "Colors", "source": "task", "task": str(task.pk),
                                                   "backend": "transformers", "gpu_mode": "auto"})
    assert response.status_code == 302
    assert Deployment.objects.get().gpu_config == {}


def test_a_gpu_request_reads_in_words_on_the_pages() -> None:
    from tasks.templatetags.task_format import gpu_request

    assert gpu_request({}) == "Automatic"
    assert gpu_request({"cpu": True}) == "CPU"
    assert gpu_request({"devices": "0,1"}) == "GPU 0,1"
    assert gpu_request({"count": 2}) == "2 × GPU"

"""Host announcement and /api/gpus/."""

from __future__ import annotations

from typing import Any

from django.core.management import call_command
from rest_framework.test import APIClient

from gpus.inventory import Discovery, GpuInfo, parse_fake_gpus
from gpus.models import Gpu, Host, Reservation, Run
from gpus.services import host_announce
from tasks.models import FinetuningTask
from tests.conftest import announce_host


def announce(name: str = "gpu-host-01", spec: str = "2x80", cpu: int = 0) -> Host:
    return announce_host(name, spec, cpu)


def running_task(owner: Any, name: str, **fields: Any) -> FinetuningTask:
    """A running task with its current run (``fields``: columns of the run, e.g. ``host``)."""
    task = FinetuningTask.objects.create(owner=owner, name=name, base_model="x/y", model_path="x/y",
                                         status="running", gpu_config=fields.pop("gpu_config", {}))
    task.run = Run.objects.create(kind="train", subject_id=task.pk, owner=owner, label=f"#{task.pk} {name}",
                                  status="running", **fields)
    task.save(update_fields=["run"])
    return task


def test_announcing_creates_the_host_and_its_gpus_and_reports_new_capacity(db: None) -> None:
    assert host_announce(name="h", discovery=Discovery("fake", parse_fake_gpus("2x80", "h")), cpu_slots=0)
    assert Gpu.objects.filter(host__name="h", present=True).count() == 2
    # The same inventory again is no new capacity.
    assert not host_announce(name="h", discovery=Discovery("fake", parse_fake_gpus("2x80", "h")), cpu_slots=0)


def test_a_card_that_disappears_is_marked_absent(db: None) -> None:
    announce(spec="2x80")
    only_first = parse_fake_gpus("2x80", "gpu-host-01")[:1]
    host_announce(name="gpu-host-01", discovery=Discovery("fake", only_first), cpu_slots=0)
    assert list(Gpu.objects.order_by("index").values_list("present", flat=True)) == [True, False]


def test_a_host_without_gpus_records_why(db: None) -> None:
    host_announce(name="laptop", discovery=Discovery("nvml", [], "no NVIDIA driver or GPU found"), cpu_slots=1)
    host = Host.objects.get(name="laptop")
    assert host.cpu_slots == 1 and "no NVIDIA driver" in host.gpu_error and not host.gpus.exists()


def test_every_user_sees_every_gpu_with_its_state(alice_api: APIClient) -> None:
    announce()
    gpus = alice_api.get("/api/gpus/").json()
    assert [(g["host"], g["index"], g["state"]) for g in gpus] == [
        ("gpu-host-01", 0, "free"),
        ("gpu-host-01", 1, "free"),
    ]
    assert gpus[0]["memory_total_mb"] == 80 * 1024 and gpus[0]["holder"] is None
    hosts = alice_api.get("/api/gpus/hosts/").json()
    assert hosts[0]["name"] == "gpu-host-01" and hosts[0]["live"] is True


def test_a_holder_task_is_named_only_to_its_owner_and_staff(
    alice: Any, alice_api: APIClient, bob_api: APIClient, staff_api: APIClient
) -> None:
    host = announce()
    gpu = host.gpus.get(index=0)
    task = running_task(alice, "secret-project")
    Reservation.objects.create(host=host, gpu=gpu, run=task.run)

    def holder(client: APIClient) -> dict[str, Any]:
        return next(g for g in client.get("/api/gpus/").json() if g["index"] == 0)

    assert holder(alice_api)["state"] == "reserved" and holder(alice_api)["holder"]["name"] == "secret-project"
    assert holder(staff_api)["holder"]["task"] == task.pk
    assert holder(bob_api)["holder"] == {"kind": "task", "task": None, "name": "another user's task",
                                         "status": "running"}


def test_staff_drain_and_enable_a_gpu_and_others_cannot(alice_api: APIClient, staff_api: APIClient) -> None:
    gpu = announce().gpus.get(index=1)
    assert alice_api.post(f"/api/gpus/{gpu.pk}/disable/").status_code == 403
    response = staff_api.post(f"/api/gpus/{gpu.pk}/disable/")
    assert response.status_code == 200 and response.json()["state"] == "disabled"
    assert staff_api.post(f"/api/gpus/{gpu.pk}/enable/").json()["state"] == "free"


def test_the_gpu_agent_command_announces_this_host(db: None, settings: Any) -> None:
    settings.FINETUNE_GPU_BACKEND = "fake"
    settings.FINETUNE_FAKE_GPUS = "1x24"
    settings.FINETUNE_HOST = "agent-host"
    call_command("gpu_agent", "--once")
    host = Host.objects.get(name="agent-host")
    # Every host offers one CPU slot by default, a GPU host too (it runs exports there).
    assert host.gpus.get().memory_total_mb == 24 * 1024 and host.cpu_slots == 1


def test_a_host_without_gpus_gets_one_cpu_slot_by_default(db: None, settings: Any) -> None:
    settings.FINETUNE_GPU_BACKEND = "none"
    settings.FINETUNE_HOST = "cpu-box"
    call_command("gpu_agent", "--once")
    assert Host.objects.get(name="cpu-box").cpu_slots == 1


def test_gpu_info_keeps_processes() -> None:
    info = GpuInfo(index=0, uuid="GPU-1", name="x", memory_total_mb=1, processes=[{"pid": 1, "used_memory_mb": 2}])
    assert info.processes[0]["pid"] == 1


# --- what a task asks for, checked against the inventory ----------------------------------------
HUB_TASK = {"name": "t", "base_model": "Qwen/Qwen2.5-7B-Instruct", "datasets": ["AI-ModelScope/alpaca-gpt4-data-en#50"]}


def test_a_task_shows_its_memory_estimate(alice_api: APIClient) -> None:
    response = alice_api.post("/api/finetuning/tasks/", {**HUB_TASK, "train_type": "qlora"}, format="json")
    assert response.status_code == 201
    assert 8 <= response.json()["memory_estimate_gb"] <= 12


def test_impossible_requests_are_a_400_naming_gpu_config(alice_api: APIClient) -> None:
    announce(spec="2x80", cpu=0)
    cases = {
        "asks for 3 GPUs but the largest host has 2": {"count": 3},
        "largest GPU has 80 GiB": {"count": 1, "min_memory_gb": 141},
        "devices 7 do not exist": {"devices": "7"},
        "no host offers CPU slots": {"cpu": True},
    }
    for fragment, gpu_config in cases.items():
        response = alice_api.post("/api/finetuning/tasks/", {**HUB_TASK, "gpu_config": gpu_config}, format="json")
        assert response.status_code == 400, (gpu_config, response.content)
        assert fragment in response.json()["gpu_config"][0]
    # A full fine-tune of 14B needs ~148 GiB per GPU (7B, ~76 GiB, would fit an 80 GB card).
    big = {**HUB_TASK, "base_model": "Qwen/Qwen2.5-14B-Instruct", "train_type": "full", "gpu_config": {"count": 1}}
    full = alice_api.post("/api/finetuning/tasks/", big, format="json")
    assert full.status_code == 400 and "use QLoRA" in full.json()["gpu_config"][0]
    assert FinetuningTask.objects.count() == 0
    ok = alice_api.post("/api/finetuning/tasks/", {**HUB_TASK, "gpu_config": {"devices": "0,1"}}, format="json")
    assert ok.status_code == 201


def test_the_detail_reports_gpu_memory_usage_per_assigned_gpu(alice: Any, alice_api: APIClient) -> None:
    host = announce(spec="2x80")
    Gpu.objects.filter(host=host, index=1).update(memory_used_mb=15000, utilization_pct=85)
    task = running_task(alice, "t", host=host.name, gpu_config={"devices": "1"})
    usage = alice_api.get(f"/api/finetuning/tasks/{task.pk}/").json()["gpu_memory_usage"]
    assert usage == {"1": {"memory_used": 15000, "memory_total": 80 * 1024, "utilization": 85}}
    seed = alice_api.get(f"/finetuning/getTask?id={task.pk}").json()["data"]["gpuMemoryUsage"]
    assert seed == usage


def test_listing_tasks_costs_the_same_queries_for_5_or_15_tasks(alice: Any, alice_api: APIClient) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    host = announce(spec="2x80")
    gpus = iter(host.gpus.all())

    def make(n: int) -> None:
        for i in range(n):
            task = running_task(alice, f"t{i}")
            gpu = next(gpus, None)
            if gpu is not None:  # some tasks hold a GPU, so the reservations path is exercised
                Reservation.objects.create(host=host, gpu=gpu, run=task.run)

    make(5)
    alice_api.get("/api/finetuning/tasks/")  # the token's last_used_at is written at most once a minute
    with CaptureQueriesContext(connection) as five:
        assert alice_api.get("/api/finetuning/tasks/").status_code == 200
    make(10)
    with CaptureQueriesContext(connection) as fifteen:
        assert alice_api.get("/api/finetuning/tasks/").json()["count"] == 15
    assert len(fifteen.captured_queries) == len(five.captured_queries)

"""Quotas staff set in admin (issue 12) and the priorities kept for staff: how a user's limits are
resolved, and every request over one refused at once with a 403 naming the quota, its limit and the
current usage (a page shows the same sentence)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import Quota, QuotaScope
from accounts.services import Limits, quota_limits, quota_limits_for
from core.errors import QuotaExceeded
from deployments import services as deployment_services
from tasks import services
from tasks.models import Dataset, FinetuningTask, TaskStatus
from tests.conftest import announce_host, upload

ARGS = {"max_steps": 4, "model_type": "qwen2", "template": "qwen2_5"}


def set_quota(*, user: User | None = None, group: Group | None = None, **limits: Any) -> Quota:
    scope = QuotaScope.USER if user else QuotaScope.GROUP if group else QuotaScope.DEFAULT
    quota, _ = Quota.objects.update_or_create(scope=scope, user=user, group=group, defaults=limits)
    return quota


def task_body(model: Path, dataset_id: int, **extra: Any) -> dict[str, Any]:
    return {"name": "colors", "base_model": str(model), "datasets": [dataset_id], "training_args": ARGS,
            "gpu_config": {"cpu": True}, **extra}


@pytest.fixture
def host(db: None) -> Any:
    return announce_host(spec="2x80", cpu=1)


@pytest.fixture
def dataset(alice_api: APIClient, data_files: dict[str, Path]) -> dict[str, Any]:
    return upload(alice_api, data_files["sft_messages"])


# --- resolving a user's limits -------------------------------------------------------------------
def test_without_any_row_only_the_waiting_task_setting_applies(alice: User, settings: Any) -> None:
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 7
    assert quota_limits(user=alice) == Limits(max_waiting_tasks=7)
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 0
    assert quota_limits(user=alice) == Limits()


def test_each_limit_comes_from_the_user_then_the_most_generous_group_then_the_default(
    alice: User, bob: User, settings: Any
) -> None:
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 50
    students, lab = Group.objects.create(name="students"), Group.objects.create(name="lab")
    alice.groups.add(students, lab)
    set_quota(max_gpus=1, gpu_hours_per_week=10, max_deployments=1, max_storage_gb=5)
    set_quota(group=students, max_gpus=2, gpu_hours_per_week=20)
    set_quota(group=lab, max_gpus=4)
    set_quota(user=alice, gpu_hours_per_week=100)
    assert quota_limits(user=alice) == Limits(max_waiting_tasks=50, max_gpus=4, gpu_hours_per_week=100,
                                              max_deployments=1, max_storage_gb=5)
    # Bob is in no group: the default row, and the setting where it says nothing.
    assert quota_limits_for(user_ids=[alice.pk, bob.pk])[bob.pk] == Limits(
        max_waiting_tasks=50, max_gpus=1, gpu_hours_per_week=10, max_deployments=1, max_storage_gb=5)


def test_staff_are_bound_only_by_their_own_row(staff: User) -> None:
    set_quota(max_gpus=1, max_waiting_tasks=3)
    assert quota_limits(user=staff) == Limits()
    set_quota(user=staff, max_gpus=8)
    assert quota_limits(user=staff) == Limits(max_gpus=8)


def test_the_limits_of_many_users_cost_the_same_queries(
    alice: User, bob: User, django_assert_max_num_queries: Any
) -> None:
    group = Group.objects.create(name="lab")
    users = [User.objects.create_user(f"u{n}", password="x-pass-123") for n in range(20)]
    for user in users:
        user.groups.add(group)
    set_quota(group=group, max_gpus=2)
    with django_assert_max_num_queries(3):
        limits = quota_limits_for(user_ids=[u.pk for u in users])
    assert {limit.max_gpus for limit in limits.values()} == {2}


# --- refusals at once ----------------------------------------------------------------------------
def test_a_task_over_the_waiting_quota_is_a_403_naming_it(
    alice_api: APIClient, alice: User, host: Any, local_model: Path, dataset: dict[str, Any]
) -> None:
    set_quota(user=alice, max_waiting_tasks=2)
    for _ in range(2):
        assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]),
                              format="json").status_code == 201
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert response.status_code == 403
    body = response.json()
    assert body["quota"] == "max_waiting_tasks" and body["limit"] == 2 and body["used"] == 2
    assert "2 tasks waiting" in body["detail"] and "max_waiting_tasks" in body["detail"]
    assert FinetuningTask.objects.filter(owner=alice).count() == 2
    # A task that started no longer counts.
    FinetuningTask.objects.filter(owner=alice).update(status=TaskStatus.RUNNING)
    assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]),
                          format="json").status_code == 201


def test_the_seed_api_and_the_page_show_the_same_refusal(
    alice: User, alice_api: APIClient, host: Any, local_model: Path, dataset: dict[str, Any]
) -> None:
    set_quota(user=alice, max_waiting_tasks=0)
    seed = alice_api.post("/finetuning/createTask", {
        "name": "colors", "baseModel": str(local_model), "datasetPath": dataset["name"],
        "trainingArgs": ARGS, "gpuConfig": {"cpu": True}}, format="json")
    assert "max_waiting_tasks" in seed.content.decode()
    page = Client()
    page.force_login(alice)
    response = page.post("/tasks/new/", {
        "mode": "custom", "name": "colors", "task_type": "sft", "train_type": "lora", "base_model": str(local_model),
        "datasets": [str(dataset["id"])], "priority": "5", "gpu_mode": "cpu", "gpu_count": "1",
        "arg_max_steps": "4", "arg_model_type": "qwen2", "arg_template": "qwen2_5"})
    assert response.status_code == 400
    assert "max_waiting_tasks" in response.content.decode()
    assert not FinetuningTask.objects.filter(owner=alice).exists()


def test_asking_for_more_gpus_than_the_quota_is_refused(
    alice: User, alice_api: APIClient, host: Any, local_model: Path, dataset: dict[str, Any]
) -> None:
    set_quota(user=alice, max_gpus=1)
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"],
                                                                  gpu_config={"count": 2}), format="json")
    assert response.status_code == 403
    assert response.json() | {"detail": ""} == {"detail": "", "quota": "max_gpus", "limit": 1, "used": 2}
    assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], gpu_config={"count": 1}),
                          format="json").status_code == 201


def test_storage_full_refuses_uploads_and_new_tasks(
    alice: User, alice_api: APIClient, host: Any, local_model: Path, dataset: dict[str, Any],
    data_files: dict[str, Path],
) -> None:
    size = Dataset.objects.get(pk=dataset["id"]).size_bytes
    set_quota(user=alice, max_storage_gb=(size + 10) / 10**9)
    with data_files["sft_messages"].open("rb") as handle:
        response = alice_api.post("/api/finetuning/datasets/", {"file": handle}, format="multipart")
    assert response.status_code == 403 and response.json()["quota"] == "max_storage_gb"
    assert "this upload adds" in response.json()["detail"]
    assert Dataset.objects.filter(owner=alice).count() == 1
    # Within the quota a task is still accepted; at the quota it is not.
    assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]),
                          format="json").status_code == 201
    set_quota(user=alice, max_storage_gb=size / 10**9)
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert response.status_code == 403 and response.json()["quota"] == "max_storage_gb"


def test_deployments_over_the_quota_are_refused(alice: User, host: Any, local_model: Path) -> None:
    set_quota(user=alice, max_deployments=1)
    args = {"model_type": "qwen2", "template": "qwen2_5"}
    deployment_services.deployment_create(owner=alice, name="one", model="fake-model", deploy_args=args,
                                          gpu_config={"cpu": True})
    with pytest.raises(QuotaExceeded) as refused:
        deployment_services.deployment_create(owner=alice, name="two", model="fake-model", deploy_args=args,
                                              gpu_config={"cpu": True})
    assert (refused.value.quota, refused.value.limit, refused.value.used) == ("max_deployments", 1, 1)


def test_a_deployment_api_refusal_is_a_403(alice: User, alice_api: APIClient, host: Any, local_model: Path) -> None:
    set_quota(user=alice, max_deployments=0)
    response = alice_api.post("/api/deployments/", {"name": "one", "model": "fake-model", "gpu_config": {"cpu": True},
                                                    "deploy_args": {"model_type": "qwen2", "template": "qwen2_5"}},
                              format="json")
    assert response.status_code == 403 and response.json()["quota"] == "max_deployments"


def test_staff_ignore_the_default_quota(staff: User, host: Any, local_model: Path, data_files: dict[str, Path]) -> None:
    set_quota(max_waiting_tasks=0)
    client = APIClient()
    client.force_authenticate(staff)
    dataset = upload(client, data_files["sft_messages"])
    response = client.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert response.status_code == 201


# --- priorities above the user level are for staff ----------------------------------------------
def test_users_may_not_create_tasks_above_the_user_priority_level(
    alice_api: APIClient, host: Any, local_model: Path, dataset: dict[str, Any], settings: Any
) -> None:
    response = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], priority=6),
                              format="json")
    assert response.status_code == 400
    assert "for staff" in response.json()["priority"][0]
    assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], priority=5),
                          format="json").json()["priority"] == 5
    settings.FINETUNE_USER_MAX_PRIORITY = 8
    assert alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"], priority=8),
                          format="json").status_code == 201


def test_a_lower_user_level_lowers_the_default_priority(
    alice_api: APIClient, host: Any, local_model: Path, dataset: dict[str, Any], settings: Any
) -> None:
    settings.FINETUNE_USER_MAX_PRIORITY = 3
    created = alice_api.post("/api/finetuning/tasks/", task_body(local_model, dataset["id"]), format="json")
    assert created.status_code == 201 and created.json()["priority"] == 3


def test_raising_a_waiting_tasks_priority_above_the_level_is_for_staff(
    alice: User, alice_api: APIClient, staff: User, host: Any, local_model: Path, dataset: dict[str, Any]
) -> None:
    task = services.finetuning_task_create(owner=alice, name="colors", base_model=str(local_model),
                                           datasets=[dataset["id"]], training_args=ARGS, gpu_config={"count": 2},
                                           priority=5)
    FinetuningTask.objects.filter(pk=task.pk).update(status=TaskStatus.PENDING)
    response = alice_api.post(f"/api/finetuning/tasks/{task.pk}/priority/", {"priority": 9}, format="json")
    assert response.status_code == 400 and "for staff" in response.json()["priority"][0]
    admin = Client()
    admin.force_login(staff)
    admin.post("/admin/tasks/finetuningtask/", {"action": "raise_priority", "_selected_action": [task.pk]})
    task.refresh_from_db()
    assert task.priority == 6
    staff_api = APIClient()
    staff_api.force_authenticate(staff)
    assert staff_api.post(f"/api/finetuning/tasks/{task.pk}/priority/", {"priority": 9},
                          format="json").json()["priority"] == 9


def test_staff_may_create_tasks_at_any_priority(staff: User, host: Any, local_model: Path) -> None:
    dataset = services.dataset_create(owner=staff, upload=_upload_file())
    task = services.finetuning_task_create(owner=staff, name="urgent", base_model=str(local_model),
                                           datasets=[dataset.pk], training_args=ARGS, gpu_config={"cpu": True},
                                           priority=10)
    assert task.priority == 10


def _upload_file() -> Any:
    row = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    return SimpleUploadedFile("hi.jsonl", io.BytesIO(row * 3).getvalue())


# --- staff set them in admin ---------------------------------------------------------------------
def test_staff_set_the_default_and_a_users_quota_in_admin(staff: User, alice: User) -> None:
    admin = Client()
    admin.force_login(staff)
    response = admin.post("/admin/accounts/quota/add/", {"scope": "default", "max_waiting_tasks": "20",
                                                         "gpu_hours_per_week": "40"})
    assert response.status_code == 302, response.content.decode()[:2000]
    wrong = admin.post("/admin/accounts/quota/add/", {"scope": "group", "max_gpus": "2"})
    assert wrong.status_code == 200 and "names that group" in wrong.content.decode()
    page = admin.get(f"/admin/auth/user/{alice.pk}/change/").content.decode()
    assert 'name="quota-__prefix__-max_gpus"' in page  # the quota inline
    assert quota_limits(user=alice) == Limits(max_waiting_tasks=20, gpu_hours_per_week=40)
    data = {
        "username": alice.username, "email": alice.email, "first_name": "", "last_name": "", "is_active": "on",
        "date_joined_0": alice.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": alice.date_joined.strftime("%H:%M:%S"),
        "initial-date_joined_0": alice.date_joined.strftime("%Y-%m-%d"),
        "initial-date_joined_1": alice.date_joined.strftime("%H:%M:%S"),
        "account-TOTAL_FORMS": "0", "account-INITIAL_FORMS": "0", "account-MIN_NUM_FORMS": "0",
        "account-MAX_NUM_FORMS": "1",
        "quota-TOTAL_FORMS": "1", "quota-INITIAL_FORMS": "0", "quota-MIN_NUM_FORMS": "0", "quota-MAX_NUM_FORMS": "1",
        "quota-0-max_gpus": "3", "quota-0-id": "", "quota-0-user": str(alice.pk), "_save": "Save",
    }
    saved = admin.post(f"/admin/auth/user/{alice.pk}/change/", data)
    assert saved.status_code == 302, saved.content.decode()[:3000]
    assert quota_limits(user=alice) == Limits(max_waiting_tasks=20, max_gpus=3, gpu_hours_per_week=40)
    assert "quota of alice" in admin.get("/admin/accounts/quota/").content.decode()

"""``GET /api/usage/`` (the caller's report) and ``GET /api/usage/users/`` (staff only: 403 for anyone
else, as for the other staff-only operations): the shape, the figures, authentication."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.usage.conftest import make_task, set_quota
from tests.usage.test_usage_selectors import users_with_usage

pytestmark = pytest.mark.django_db

WINDOW_KEYS = {"since", "until", "gpu_seconds", "gpu_hours", "gpu_hours_by_model", "cpu_slot_seconds",
               "cpu_slot_hours", "training_runs", "export_runs", "deployment_runs"}
QUOTA_NAMES = {"max_waiting_tasks", "max_gpus", "gpu_hours_per_week", "max_deployments", "max_storage_gb"}


def test_alice_gets_her_report_with_every_window_labelled(
    alice_api: APIClient, alice: User, alice_runs: dict[str, Any], frozen_now: datetime, settings: Any
) -> None:
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 20
    set_quota(alice, gpu_hours_per_week=10, max_storage_gb=4)
    make_task(alice, name="big", output_bytes=2 * 10**9)
    response = alice_api.get("/api/usage/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"username", "week", "month", "rolling_7d", "daily", "gpu_models", "storage_bytes",
                         "gpus_held", "running_deployments", "waiting_tasks", "quotas"}
    assert body["username"] == "alice"
    for name in ("week", "month", "rolling_7d"):
        assert set(body[name]) == WINDOW_KEYS
        expected = alice_runs[name]
        assert body[name]["gpu_hours"] == pytest.approx(expected["gpu_hours"])
        assert body[name]["gpu_seconds"] == pytest.approx(expected["gpu_hours"] * 3600)
        assert body[name]["gpu_hours_by_model"] == pytest.approx(expected["by_model"])
        assert body[name]["cpu_slot_hours"] == pytest.approx(expected["cpu_slot_hours"])
        assert body[name]["training_runs"] == expected["training_runs"]
        assert body[name]["deployment_runs"] == expected["deployment_runs"]
    assert body["week"]["since"] == "2026-03-09T00:00:00Z" and body["month"]["since"] == "2026-03-01T00:00:00Z"
    assert body["rolling_7d"]["since"] == "2026-03-04T12:00:00Z" and body["week"]["until"] == "2026-03-11T12:00:00Z"
    assert len(body["daily"]) == 30 and body["daily"][-1]["day"] == "2026-03-11"
    assert body["daily"][-2] == {"day": "2026-03-10", "gpu_hours": pytest.approx(6.0), "cpu_slot_hours": 0.0}
    assert {row["model"]: row["gpu_hours_month"] for row in body["gpu_models"]} == pytest.approx(
        {"A100": 4.0, "H100": 11.0})
    assert body["storage_bytes"] == 2 * 10**9 and body["running_deployments"] == 1
    quotas = body["quotas"]
    assert set(quotas) == QUOTA_NAMES
    assert quotas["gpu_hours_per_week"] == {"limit": 10.0, "used": pytest.approx(11.0), "unit": "GPU-hours",
                                            "percent": pytest.approx(110.0), "reached": True}
    assert quotas["max_storage_gb"] == {"limit": 4.0, "used": 2.0, "unit": "GB", "percent": 50.0, "reached": False}
    assert quotas["max_waiting_tasks"]["limit"] == 20.0 and quotas["max_waiting_tasks"]["used"] == 0
    assert quotas["max_gpus"] == {"limit": None, "used": 0.0, "unit": "GPUs", "percent": None, "reached": False}


def test_a_new_users_report_is_all_zeros_and_her_limits(bob_api: APIClient) -> None:
    body = bob_api.get("/api/usage/").json()
    assert body["week"]["gpu_hours"] == 0 and body["gpu_models"] == [] and body["storage_bytes"] == 0
    assert all(day["gpu_hours"] == 0 for day in body["daily"]) and len(body["daily"]) == 30


def test_the_session_of_the_pages_works_too_and_a_visitor_gets_401(alice: User, db: None) -> None:
    client = APIClient()
    assert client.get("/api/usage/").status_code == 401
    assert client.get("/api/usage/users/").status_code == 401
    client.force_login(alice)
    assert client.get("/api/usage/").json()["username"] == "alice"


def test_bob_cannot_list_every_users_usage(bob_api: APIClient, alice_runs: dict[str, Any]) -> None:
    response = bob_api.get("/api/usage/users/")
    assert response.status_code == 403
    assert "alice" not in response.content.decode()
    assert response.json() == {"detail": "Only operators (staff) can see every user's usage."}


def test_staff_list_every_users_usage_and_the_largest_outputs(
    staff_api: APIClient, alice: User, bob: User, alice_runs: dict[str, Any], frozen_now: datetime
) -> None:
    set_quota(alice, gpu_hours_per_week=10)
    task = make_task(bob, name="huge", output_bytes=5 * 10**9)
    response = staff_api.get("/api/usage/users/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"periods", "results", "daily", "gpu_models", "largest_outputs"}
    assert body["periods"] == {"now": "2026-03-11T12:00:00Z", "week_since": "2026-03-09T00:00:00Z",
                               "month_since": "2026-03-01T00:00:00Z", "rolling_since": "2026-03-04T12:00:00Z"}
    rows = {row["username"]: row for row in body["results"]}
    assert [row["username"] for row in body["results"]] == ["alice", "bob"]
    assert rows["alice"]["gpu_hours_week"] == pytest.approx(9.0)
    assert rows["alice"]["gpu_hours_month"] == pytest.approx(15.0)
    assert rows["alice"]["gpu_hours_rolling_7d"] == pytest.approx(11.0)
    assert rows["alice"]["cpu_slot_hours_month"] == pytest.approx(96.0)
    assert rows["alice"]["training_runs_month"] == 3 and rows["alice"]["deployment_runs_month"] == 1
    assert rows["alice"]["quotas_reached"] == ["gpu_hours_per_week"]
    assert rows["alice"]["id"] == alice.pk and rows["bob"]["storage_bytes"] == 5 * 10**9
    assert rows["bob"]["quotas_reached"] == [] and set(rows["bob"]["quotas"]) == QUOTA_NAMES
    assert len(body["daily"]) == 30 and body["daily"][-2]["gpu_hours"] == pytest.approx(8.0)  # 6 + Bob's 2
    assert body["largest_outputs"] == [{"task": task.pk, "name": "huge", "owner": "bob", "status": "completed",
                                        "output_bytes": 5 * 10**9, "output_measured_at": None}]


def test_the_staff_list_takes_as_many_queries_for_20_users_as_for_2(staff_api: APIClient) -> None:
    users_with_usage(2)
    staff_api.get("/api/usage/users/")  # the token's first use is recorded once; not what is measured
    with CaptureQueriesContext(connection) as two:
        assert staff_api.get("/api/usage/users/").status_code == 200
    users_with_usage(18, start=2)
    with CaptureQueriesContext(connection) as twenty:
        assert len(staff_api.get("/api/usage/users/").json()["results"]) == 20
    assert len(two) == len(twenty)


def test_the_report_is_read_only(alice_api: APIClient, staff_api: APIClient) -> None:
    assert alice_api.post("/api/usage/", {}).status_code == 405
    assert staff_api.delete("/api/usage/users/").status_code == 405

"""The usage pages: ``/usage/`` (a user's own figures, quotas, the daily chart's data, an empty state
for a new user), ``/usage/all/`` (staff only: every user, sortable, the largest outputs) and the
admin's read-only "Usage by user" report; the staff views' query counts do not grow with users."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.usage.conftest import make_task, set_quota
from tests.usage.test_usage_selectors import users_with_usage

pytestmark = pytest.mark.django_db


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def section(html: str, marker: str) -> str:
    """The element that ``marker`` (an attribute) opens, up to the next one of its kind."""
    start = html.index(marker)
    return html[start:start + 2500]


def fact(html: str, window: str, name: str) -> str:
    match = re.search(rf'data-field="{name}">([^<]*)<', section(html, f'data-window="{window}"'))
    assert match, (window, name)
    return match.group(1).strip()


# --- /usage/ -----------------------------------------------------------------------------------------
def test_alices_usage_page_shows_her_week_month_and_rolling_7_days(
    alice: User, alice_runs: dict[str, Any], frozen_now: datetime
) -> None:
    response = logged_in(alice).get("/usage/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "No usage yet." not in html
    assert (fact(html, "week", "gpu_hours"), fact(html, "month", "gpu_hours"),
            fact(html, "rolling_7d", "gpu_hours")) == ("9.0", "15.0", "11.0")
    assert (fact(html, "week", "cpu_slot_hours"), fact(html, "month", "cpu_slot_hours"),
            fact(html, "rolling_7d", "cpu_slot_hours")) == ("0.0", "96.0", "48.0")
    assert (fact(html, "month", "training_runs"), fact(html, "month", "export_runs"),
            fact(html, "month", "deployment_runs")) == ("3", "1", "1")
    assert "since Monday 9 Mar" in html and "since 1 Mar 2026" in html
    assert "what the GPU-hour quota counts" in html
    models = section(html, 'id="gpu-models"')
    assert re.search(r'data-model="H100"><td>H100</td><td class="num">7.0</td><td class="num">11.0</td>'
                     r'<td class="num">7.0</td>', models)
    assert 'data-model="A100"' in models


def test_the_chart_data_is_the_last_30_days_embedded_in_the_page(
    alice: User, alice_runs: dict[str, Any], frozen_now: datetime
) -> None:
    html = logged_in(alice).get("/usage/").content.decode()
    data = json.loads(re.search(r'<script id="usage-daily" type="application/json">(.*?)</script>', html).group(1))
    assert len(data["days"]) == 30 and data["days"][0] == "2026-02-10" and data["days"][-1] == "2026-03-11"
    assert data["gpu_hours"][-2:] == [6.0, 1.0]
    assert data["cpu_slot_hours"][data["days"].index("2026-03-04")] == 48.0
    assert data["labels"]["gpuHours"] == "GPU-hours"
    assert '<canvas id="usage-chart"' in html and "vendor/chartjs/chart.umd.min.js" in html and "js/usage.js" in html


def test_quotas_show_used_against_the_limit_with_a_bar_or_say_there_is_no_limit(
    alice: User, alice_runs: dict[str, Any], frozen_now: datetime, settings: Any
) -> None:
    settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS = 0
    set_quota(alice, gpu_hours_per_week=10, max_storage_gb=10)
    make_task(alice, name="big", output_bytes=25 * 10**8)
    html = logged_in(alice).get("/usage/").content.decode()
    gpu_hours = section(html, 'data-quota="gpu_hours_per_week"').split("</tr>")[0]
    assert 'class="reached"' in gpu_hours and "reached</span>" in gpu_hours
    assert 'data-field="used">11<' in gpu_hours and 'data-field="limit">10<' in gpu_hours
    assert 'aria-valuenow="100"' in gpu_hours
    storage = section(html, 'data-quota="max_storage_gb"').split("</tr>")[0]
    assert "2.50 GB" in storage and 'aria-valuenow="25"' in storage and "reached" not in storage
    gpus = section(html, 'data-quota="max_gpus"').split("</tr>")[0]
    assert "no limit" in gpus and "progressbar" not in gpus
    storage_card = section(html, 'id="storage"')
    assert 'data-field="storage">2.50\xa0GB<' in storage_card and 'href="/tasks/"' in storage_card


def test_a_new_user_sees_an_empty_state_that_says_what_will_appear_and_her_quotas(bob: User) -> None:
    html = logged_in(bob).get("/usage/").content.decode()
    assert "No usage yet." in html and "Create a task" in html
    assert 'data-quota="max_waiting_tasks"' in html  # the quotas she may use are still shown
    assert "No GPU time this month or in the last 7 days." in html


def test_the_nav_links_to_usage_and_staff_also_get_the_all_users_page(alice: User, staff: User) -> None:
    html = logged_in(alice).get("/usage/").content.decode()
    assert 'href="/usage/" class="active" aria-current="page"' in html and 'href="/usage/all/"' not in html
    html = logged_in(staff).get("/").content.decode()
    assert 'href="/usage/"' in html and 'href="/usage/all/"' in html


def test_a_visitor_is_sent_to_log_in(client: Client, db: None) -> None:
    for url in ("/usage/", "/usage/all/"):
        response = client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- /usage/all/ -------------------------------------------------------------------------------------
def test_bob_cannot_see_every_users_usage(bob: User) -> None:
    assert logged_in(bob).get("/usage/all/").status_code == 404


def test_staff_see_every_user_with_usage_sorted_and_the_largest_outputs(
    alice: User, bob: User, staff: User, alice_runs: dict[str, Any], frozen_now: datetime
) -> None:
    set_quota(alice, gpu_hours_per_week=10)
    task = make_task(bob, name="huge-output", output_bytes=7 * 10**9)
    client = logged_in(staff)
    html = client.get("/usage/all/").content.decode()
    assert re.findall(r'<tr data-user="(\w+)">', html) == ["alice", "bob"]  # GPU-hours this month first
    alice_row = section(html, '<tr data-user="alice">').split("</tr>")[0]
    assert 'data-field="gpu_week">9.0<' in alice_row and 'data-field="gpu_month">15.0<' in alice_row
    assert 'data-field="gpu_7d">11.0<' in alice_row and 'data-field="cpu_month">96.0<' in alice_row
    assert 'data-field="tasks">3<' in alice_row and 'data-field="deployments">1<' in alice_row
    assert "GPU-hours in the last 7 days</span>" in alice_row  # the quota she reached
    bob_row = section(html, '<tr data-user="bob">').split("</tr>")[0]
    assert "badge-quota" not in bob_row and "7.00\xa0GB" in bob_row
    outputs = section(html, 'id="largest-outputs"')
    assert f'href="/admin/tasks/finetuningtask/{task.pk}/change/"' in outputs and "huge-output" in outputs
    assert "7.00\xa0GB" in outputs
    assert 'aria-sort="descending"' in section(html, "<thead>")

    html = client.get("/usage/all/?sort=user").content.decode()
    assert re.findall(r'<tr data-user="(\w+)">', html) == ["alice", "bob"]
    assert 'href="?sort=-user" data-sort="user"' in html  # a second click reverses
    html = client.get("/usage/all/?sort=storage").content.decode()
    assert re.findall(r'<tr data-user="(\w+)">', html) == ["alice", "bob"]  # ascending: bob's 7 GB last
    html = client.get("/usage/all/?sort=-storage").content.decode()
    assert re.findall(r'<tr data-user="(\w+)">', html) == ["bob", "alice"]
    assert client.get("/usage/all/?sort=%00bogus").status_code == 200


def test_the_all_users_page_says_so_when_nobody_used_anything(staff: User) -> None:
    html = logged_in(staff).get("/usage/all/").content.decode()
    assert "No usage yet." in html and "No task output takes storage yet." in html


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_the_staff_page_and_the_admin_report_take_as_many_queries_for_20_users_as_for_2(staff: User) -> None:
    client = logged_in(staff)
    users_with_usage(2)
    two = (_queries(client, "/usage/all/"), _queries(client, "/admin/usage/userusage/"))
    users_with_usage(18, start=2)
    twenty = (_queries(client, "/usage/all/"), _queries(client, "/admin/usage/userusage/"))
    assert two == twenty
    assert client.get("/usage/all/").content.decode().count("<tr data-user=") == 20


# --- admin -------------------------------------------------------------------------------------------
def test_the_admin_usage_report_shows_each_users_figures_and_is_read_only(
    alice: User, bob: User, staff: User, alice_runs: dict[str, Any], frozen_now: datetime
) -> None:
    client = logged_in(staff)
    html = client.get("/admin/usage/userusage/").content.decode()
    assert "Usage by user" in html or "usage by user" in html
    alice_row = html[html.index(">alice<"):].split("</tr>")[0]
    cells = re.findall(r'<td class="field-(\w+)">([^<]*)</td>', alice_row)
    assert dict(cells)["gpu_hours_week"] == "9.0" and dict(cells)["gpu_hours_month"] == "15.0"
    assert dict(cells)["gpu_hours_rolling_7d"] == "11.0" and dict(cells)["cpu_slot_hours_month"] == "96.0"
    assert dict(cells)["training_runs_month"] == "3" and dict(cells)["deployment_runs_month"] == "1"
    assert 'href="/admin/usage/userusage/add/"' not in html
    assert client.get("/admin/usage/userusage/add/").status_code == 403
    assert client.post(f"/admin/usage/userusage/{alice.pk}/delete/").status_code in (403, 302)
    assert User.objects.filter(pk=alice.pk).exists()


def test_bob_without_admin_access_is_sent_to_the_admin_log_in(bob: User) -> None:
    response = logged_in(bob).get("/admin/usage/userusage/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]

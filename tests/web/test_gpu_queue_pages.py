"""The GPUs page (/gpus/) and the queue page (/queue/): what each user sees, what staff and owners
can do from them, and what they cannot."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from gpus.inventory import Discovery
from gpus.models import Gpu, Host, Reservation
from gpus.services import host_announce
from tasks.models import FinetuningTask, TaskStatus
from tests.conftest import announce_host

pytestmark = pytest.mark.django_db


@pytest.fixture
def waiting(make_task: Callable[..., FinetuningTask]) -> Callable[..., FinetuningTask]:
    """A task waiting in the queue (``pending``)."""

    def make(owner: User, name: str, **fields: Any) -> FinetuningTask:
        fields.setdefault("gpu_config", {"count": 1})
        return make_task(owner, name=name, status=TaskStatus.PENDING, **fields)

    return make


def hold(task: FinetuningTask, host: Host, index: int) -> Reservation:
    """``task`` holds GPU ``index`` of ``host`` (as a dispatch would have booked it)."""
    return Reservation.objects.create(host=host, gpu=host.gpus.get(index=index), run=task.run)


def gpu_row(html: str, gpu: Gpu) -> str:
    match = re.search(rf'<tr data-gpu-id="{gpu.pk}".*?</tr>', html, re.S)
    assert match, f"no row for GPU {gpu.pk}"
    return match.group(0)


def queue_row(html: str, position: int) -> str:
    rows = re.findall(r"<tr data-key=\"[tp]\d+\".*?</tr>", html, re.S)
    return rows[position - 1]


# --- the GPUs page: empty, and with hosts -----------------------------------------------------------
def test_the_gpus_page_tells_what_to_do_when_no_worker_has_reported(alice_client: Client) -> None:
    html = alice_client.get("/gpus/").content.decode()
    assert "No worker has reported yet." in html
    assert "<code>make worker</code>" in html
    assert 'data-gpu-id="' not in html.split('<template id="host-template">')[0]


def test_the_pages_need_a_login(client: Client) -> None:
    for url in ("/gpus/", "/queue/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_every_gpu_is_listed_by_host_with_memory_utilization_and_temperature(alice_client: Client) -> None:
    big = announce_host("gpu-b", "2x80")
    announce_host("gpu-a", "24", cpu=2)
    Gpu.objects.filter(host=big, index=1).update(memory_used_mb=40 * 1024, utilization_pct=37, temperature_c=54)
    html = alice_client.get("/gpus/").content.decode()
    assert "No worker has reported yet." not in html.split('<template id="host-template">')[0].split("data-empty")[0]
    assert html.index('data-host="gpu-a"') < html.index('data-host="gpu-b"')  # hosts by name
    row = gpu_row(html, big.gpus.get(index=1))
    assert "Fake GPU 80GB" in row
    assert "40.0 / 80.0 GiB" in row and 'style="width: 50%"' in row  # the memory bar
    assert "37%" in row and 'style="width: 37%"' in row  # the utilization bar
    assert "54 °C" in row
    assert 'class="badge badge-gpu-free"' in row and ">free<" in row
    assert "3 of 3 GPUs free" in html and "2 of 2 hosts live" in html
    card_a = html[html.index('data-host="gpu-a"'):html.index('data-host="gpu-b"')]
    assert "badge-host-live" in card_a and "<code data-field=\"backend\">fake</code>" in card_a
    assert "0 of 2 held" in card_a and "slot 0" in card_a and "slot 1" in card_a
    card_b = html[html.index('data-host="gpu-b"'):]
    assert '<dd data-field="cpu">none</dd>' in card_b and "slot 0" not in card_b.split("<template")[0]


def test_an_offline_host_and_a_discovery_problem_are_shown(alice_client: Client) -> None:
    host = announce_host("old-box", "1x40")
    Host.objects.filter(pk=host.pk).update(last_seen_at=timezone.now() - timedelta(hours=2))
    host_announce(name="cpu-box", discovery=Discovery("nvml", [], "no NVIDIA driver or GPU found (NVML: x)"),
                  cpu_slots=1)
    html = alice_client.get("/gpus/").content.decode()
    old = html[html.index('data-host="old-box"'):]
    assert "badge-host-offline" in old and ">2h 00m ago<" in old
    assert 'class="badge badge-gpu-offline"' in gpu_row(html, host.gpus.get())
    cpu_box = html[html.index('data-host="cpu-box"'):html.index('data-host="old-box"')]
    assert "no NVIDIA driver or GPU found" in cpu_box and "<code data-field=\"backend\">nvml</code>" in cpu_box
    assert "No GPU on this host" in cpu_box


def test_draining_and_disabled_gpus_are_told_apart(
    alice_client: Client, alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    host = announce_host("gpu-a", "2x80")
    hold(make_task(alice, name="long run"), host, 0)
    Gpu.objects.filter(host=host).update(enabled=False)
    html = alice_client.get("/gpus/").content.decode()
    assert "badge-gpu-draining" in gpu_row(html, host.gpus.get(index=0))
    assert "badge-gpu-disabled" in gpu_row(html, host.gpus.get(index=1))


def test_the_holder_is_a_link_for_its_owner_and_staff_and_anonymous_to_others(
    alice_client: Client, bob_client: Client, staff_client: Client, alice: User,
    make_task: Callable[..., FinetuningTask],
) -> None:
    host = announce_host("gpu-a", "2x80", cpu=2)
    task = make_task(alice, name="alice-secret-run")
    hold(task, host, 1)
    Reservation.objects.create(host=host, cpu_slot=0, run=make_task(alice, name="alice-cpu-job").run)
    link = f'href="{reverse("task_detail", args=[task.pk])}"'
    for client in (alice_client, staff_client):
        html = client.get("/gpus/").content.decode()
        row = gpu_row(html, host.gpus.get(index=1))
        assert "badge-gpu-reserved" in row and "alice-secret-run" in row and link in row
        assert "alice-cpu-job" in html and "1 of 2 held" in html
    html = bob_client.get("/gpus/").content.decode()
    row = gpu_row(html, host.gpus.get(index=1))
    assert "badge-gpu-reserved" in row and "another user&#x27;s task" in row
    assert "alice-secret-run" not in html and "alice-cpu-job" not in html
    assert link not in html and f"/tasks/{task.pk}/" not in html
    assert "1 of 2 held" in html


def test_a_task_placed_by_the_dispatcher_shows_on_its_gpu(
    alice_client: Client, waiting: Callable[..., FinetuningTask], alice: User
) -> None:
    from gpus.scheduler import dispatch

    host = announce_host(settings.FINETUNE_HOST, "1x24,1x80")
    task = waiting(alice, "placed", gpu_config={"count": 1, "min_memory_gb": 40})
    assert dispatch() == [task.run_id]
    html = alice_client.get("/gpus/").content.decode()
    assert "badge-gpu-free" in gpu_row(html, host.gpus.get(index=0))
    row = gpu_row(html, host.gpus.get(index=1))  # the only card with 40 GiB
    assert "badge-gpu-reserved" in row and "placed" in row
    assert "No task is waiting." in alice_client.get("/queue/").content.decode()


def test_the_pages_cost_the_same_queries_however_many_gpus_and_tasks(
    alice_client: Client, alice: User, bob: User, waiting: Callable[..., FinetuningTask],
    make_task: Callable[..., FinetuningTask],
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def cost(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert alice_client.get(url).status_code == 200
        return len(queries)

    host = announce_host("gpu-a", "1x80", cpu=1)
    hold(make_task(alice, name="one"), host, 0)
    waiting(alice, "w1")
    small = {url: cost(url) for url in ("/gpus/", "/queue/")}
    for n in range(3):
        more = announce_host(f"gpu-{n}", "4x80", cpu=2)
        for index in range(3):
            hold(make_task(bob if index % 2 else alice, name=f"r{n}{index}"), more, index)
        Reservation.objects.create(host=more, cpu_slot=0, run=make_task(bob, name=f"c{n}").run)
        waiting(bob, f"wb{n}")
        waiting(alice, f"wa{n}", held=True)
    assert {url: cost(url) for url in ("/gpus/", "/queue/")} == small


# --- draining (staff only) ----------------------------------------------------------------------------
def test_staff_see_the_drain_buttons_with_a_confirmation_and_others_do_not(
    alice_client: Client, staff_client: Client
) -> None:
    host = announce_host("gpu-a", "1x80")
    gpu = host.gpus.get()
    html = staff_client.get("/gpus/").content.decode()
    row = gpu_row(html, gpu)
    assert f'action="{reverse("gpu_disable", args=[gpu.pk])}"' in row and "Disable (drain)" in row
    assert 'data-confirm="Drain GPU 0 on gpu-a?' in row
    html = alice_client.get("/gpus/").content.decode()
    assert "Disable (drain)" not in html and reverse("gpu_disable", args=[gpu.pk]) not in html


def test_staff_drain_and_enable_a_gpu(staff_client: Client) -> None:
    gpu = announce_host("gpu-a", "1x80").gpus.get()
    response = staff_client.post(reverse("gpu_disable", args=[gpu.pk]), follow=True)
    gpu.refresh_from_db()
    assert not gpu.enabled
    assert "is draining" in response.content.decode()
    row = gpu_row(response.content.decode(), gpu)
    assert "badge-gpu-disabled" in row and "Enable" in row
    staff_client.post(reverse("gpu_enable", args=[gpu.pk]))
    gpu.refresh_from_db()
    assert gpu.enabled


def test_a_non_staff_user_cannot_drain_a_gpu(alice_client: Client) -> None:
    gpu = announce_host("gpu-a", "1x80").gpus.get()
    assert alice_client.post(reverse("gpu_disable", args=[gpu.pk])).status_code == 403
    Gpu.objects.filter(pk=gpu.pk).update(enabled=False)
    assert alice_client.post(reverse("gpu_enable", args=[gpu.pk])).status_code == 403
    gpu.refresh_from_db()
    assert not gpu.enabled  # unchanged by the refused enable either


def test_draining_needs_a_post_and_a_csrf_token(staff: User, staff_client: Client) -> None:
    gpu = announce_host("gpu-a", "1x80").gpus.get()
    assert staff_client.get(reverse("gpu_disable", args=[gpu.pk])).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(staff)
    assert strict.post(reverse("gpu_disable", args=[gpu.pk])).status_code == 403
    gpu.refresh_from_db()
    assert gpu.enabled
    assert staff_client.post(reverse("gpu_disable", args=[999999])).status_code == 404


# --- the queue page -------------------------------------------------------------------------------
def test_the_queue_page_has_an_empty_state(alice_client: Client) -> None:
    html = alice_client.get("/queue/").content.decode()
    assert "No task is waiting." in html and reverse("task_new") in html
    assert "Waiting: 0 · on hold: 0 · yours: 0" in html


def test_waiting_tasks_are_listed_in_dispatch_order_with_their_request(
    alice_client: Client, waiting: Callable[..., FinetuningTask], alice: User, bob: User
) -> None:
    first = waiting(alice, "first-in-line", priority=5)
    urgent = waiting(alice, "urgent", priority=9, gpu_config={"count": 2, "min_memory_gb": 40})
    waiting(bob, "bobs-job", priority=5, gpu_config={"devices": "0,1"})
    waiting(alice, "smoke", priority=1, gpu_config={"cpu": True}, held=True)
    FinetuningTask.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(hours=2))
    html = alice_client.get("/queue/").content.decode()
    assert "Waiting: 4 · on hold: 1 · yours: 3" in html
    one, two, three, four = (queue_row(html, n) for n in (1, 2, 3, 4))
    assert "urgent" in one and "2 × GPU · ≥ 40 GiB each" in one and 'value="9"' in one
    # Within priority 5 users take turns: Alice's urgent task will hold 2 GPUs, so Bob goes first.
    assert "another user&#x27;s task" in two and "GPU 0,1" in two
    assert "first-in-line" in three and "2h 00m" in three  # waited
    assert "smoke" in four and "a CPU slot" in four and "on hold" in four
    assert "no worker host is online" in three
    assert urgent.pk  # (listed first although created later: larger priority first)


def test_the_estimated_start_is_shown_or_the_reason_when_unknown(
    alice_client: Client, waiting: Callable[..., FinetuningTask], alice: User,
    make_task: Callable[..., FinetuningTask],
) -> None:
    host = announce_host("gpu-a", "1x80")
    running = make_task(alice, name="running", eta_seconds=12 * 60, gpu_config={"count": 1})
    hold(running, host, 0)
    waiting(alice, "after-running")
    waiting(alice, "never-fits", gpu_config={"count": 4})
    html = alice_client.get("/queue/").content.decode()
    assert re.search(r"in ~1[23] min", queue_row(html, 1))
    assert "after running tasks end" in queue_row(html, 1)
    assert "does not fit on any online host" in queue_row(html, 2)


def test_bob_sees_alices_waiting_task_without_its_name_owner_id_or_actions(
    bob_client: Client, waiting: Callable[..., FinetuningTask], alice: User, bob: User
) -> None:
    task = waiting(alice, "alice-secret-task", priority=7, gpu_config={"count": 2})
    waiting(bob, "bobs-own", priority=3)
    html = bob_client.get("/queue/").content.decode()
    row = queue_row(html, 1)
    assert "another user&#x27;s task" in row and "2 × GPU" in row and ">7<" in row
    assert "alice-secret-task" not in html and "alice" not in row
    assert f"/tasks/{task.pk}/" not in html and f"/queue/{task.pk}/" not in html and f"#{task.pk}" not in row
    assert 'data-form="cancel" action=""' in row and 'data-key="p1"' in row
    own = queue_row(html, 2)
    assert "bobs-own" in own and reverse("queue_cancel", args=[FinetuningTask.objects.get(name="bobs-own").pk]) in own


def test_staff_see_and_may_act_on_every_waiting_task(
    staff_client: Client, waiting: Callable[..., FinetuningTask], alice: User
) -> None:
    task = waiting(alice, "alice-task")
    html = staff_client.get("/queue/").content.decode()
    assert "alice-task" in html and reverse("queue_priority", args=[task.pk]) in html
    staff_client.post(reverse("queue_priority", args=[task.pk]), {"priority": "8"})
    task.refresh_from_db()
    assert task.priority == 8


def test_the_owner_changes_priority_holds_releases_and_cancels_from_the_queue(
    alice_client: Client, waiting: Callable[..., FinetuningTask], alice: User
) -> None:
    task = waiting(alice, "mine", priority=5)
    response = alice_client.post(reverse("queue_priority", args=[task.pk]), {"priority": "2"}, follow=True)
    task.refresh_from_db()
    assert task.priority == 2 and "now has priority 2" in response.content.decode()
    # Above FINETUNE_USER_MAX_PRIORITY (5) is for staff: the page says so and nothing changes.
    response = alice_client.post(reverse("queue_priority", args=[task.pk]), {"priority": "9"}, follow=True)
    task.refresh_from_db()
    assert task.priority == 2 and "are for staff" in response.content.decode()

    response = alice_client.post(reverse("queue_hold", args=[task.pk]), follow=True)
    task.refresh_from_db()
    assert task.held and "is on hold" in response.content.decode()
    assert re.search(r'data-field="held"\s*>', response.content.decode())  # the badge is not hidden

    response = alice_client.post(reverse("queue_release", args=[task.pk]), follow=True)
    task.refresh_from_db()
    assert not task.held and "was released" in response.content.decode()

    response = alice_client.post(reverse("queue_cancel", args=[task.pk]), follow=True)
    task.refresh_from_db()
    assert task.status == TaskStatus.STOPPED and "was cancelled" in response.content.decode()
    assert "No task is waiting." in response.content.decode()


def test_a_refused_change_shows_the_services_reason(
    alice_client: Client, waiting: Callable[..., FinetuningTask], alice: User,
    make_task: Callable[..., FinetuningTask],
) -> None:
    task = waiting(alice, "mine", priority=5)
    for bad in ("11", "high", ""):
        response = alice_client.post(reverse("queue_priority", args=[task.pk]), {"priority": bad}, follow=True)
        html = response.content.decode()
        assert "did not change" in html and "whole number from 0 to 10" in html
    task.refresh_from_db()
    assert task.priority == 5
    running = make_task(alice, name="already-running")
    html = alice_client.post(reverse("queue_hold", args=[running.pk]), follow=True).content.decode()
    assert "was not held" in html and "only a waiting task can be held" in html
    html = alice_client.post(reverse("queue_priority", args=[running.pk]), {"priority": "3"},
                             follow=True).content.decode()
    assert "only a waiting task" in html
    running.refresh_from_db()
    assert running.priority == 5 and not running.held


def test_bob_cannot_act_on_alices_task(
    bob_client: Client, waiting: Callable[..., FinetuningTask], alice: User
) -> None:
    task = waiting(alice, "alices")
    for name, data in (("queue_priority", {"priority": "10"}), ("queue_hold", {}), ("queue_release", {}),
                       ("queue_cancel", {})):
        assert bob_client.post(reverse(name, args=[task.pk]), data).status_code == 404
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING and task.priority == 5 and not task.held


def test_queue_actions_need_a_post_and_a_csrf_token(alice: User, waiting: Callable[..., FinetuningTask]) -> None:
    task = waiting(alice, "mine")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.get(reverse("queue_cancel", args=[task.pk])).status_code == 405
    assert strict.post(reverse("queue_cancel", args=[task.pk])).status_code == 403
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING


# --- Chinese ------------------------------------------------------------------------------------------
def test_both_pages_render_in_chinese_with_data(
    alice_client: Client, bob: User, alice: User, waiting: Callable[..., FinetuningTask],
    make_task: Callable[..., FinetuningTask],
) -> None:
    host = announce_host("gpu-a", "2x80", cpu=1)
    hold(make_task(bob, name="bobs-run"), host, 0)
    waiting(alice, "mine")
    waiting(bob, "bobs-waiting", held=True)
    for url in ("/gpus/", "/queue/"):
        response = alice_client.get(url, HTTP_ACCEPT_LANGUAGE="zh-hans,zh;q=0.9")
        assert response.status_code == 200
        html = response.content.decode()
        assert 'lang="zh-hans"' in html and 'data-lang="zh-hans"' in html
        assert "队列" in html  # "Queue" in the navigation
        assert "bobs-run" not in html and "bobs-waiting" not in html

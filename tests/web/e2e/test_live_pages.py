"""The live pages other than the task page, in a real browser against daphne (embedded mode: the
test writes the database and the outbox, daphne's one follower hands the notices to the sockets):
the GPUs page, the queue and a deployment follow their sockets without a reload or an HTTP poll.

Run apart from the rest of the suite: ``.venv/bin/python -m pytest -m e2e tests/web/e2e``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User

from core.live.publish import publish
from deployments.logs import DeploymentLog
from deployments.models import Deployment, DeploymentStatus
from gpus.models import Gpu
from gpus.scheduler import INVENTORY_GROUP
from tasks.models import FinetuningTask, TaskStatus
from tasks.publisher import publish_event
from tests.conftest import announce_host
from tests.web.e2e.test_browser import log_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_the_gpus_queue_and_deployment_pages_follow_their_sockets(
    browser: Any, web_server: Callable[..., str], alice: User, make_task: Callable[..., FinetuningTask]
) -> None:
    from playwright.sync_api import expect

    base_url = web_server()
    host = announce_host("gpu-a", "2x80", cpu=1)
    page = log_in(browser, base_url, "alice", "alice-pass-123")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    # GPUs: a new reading arrives with the agent's notice.
    page.goto("/gpus/")
    expect(page.locator("[data-connection]")).to_have_attribute("data-state", "connected", timeout=15_000)
    gpu = host.gpus.get(index=0)
    Gpu.objects.filter(pk=gpu.pk).update(memory_used_mb=20 * 1024, utilization_pct=88)
    publish(INVENTORY_GROUP, {"host": "gpu-a", "changed": False})
    row = page.locator(f'tr[data-gpu-id="{gpu.pk}"]')
    expect(row.locator("[data-field=mem]")).to_have_text("20.0 / 80.0 GiB", timeout=10_000)
    expect(row.locator("[data-field=util]")).to_have_text("88%")

    # Queue: a task created meanwhile appears, with working forms (the page's CSRF token).
    page.goto("/queue/")
    expect(page.locator("[data-connection]")).to_have_attribute("data-state", "connected", timeout=15_000)
    task = make_task(alice, name="waits-live", status=TaskStatus.PENDING)
    publish_event(task, "created", "Created")
    queued = page.locator(f'tr[data-key="t{task.pk}"]')
    expect(queued).to_contain_text("waits-live", timeout=10_000)
    token = queued.locator("form[data-form=hold] input[name=csrfmiddlewaretoken]").input_value()
    assert token and token != "live"

    # A deployment: its log lines and its status, through the socket.
    deployment = Deployment.objects.create(owner=alice, name="colors-chat", status=DeploymentStatus.STARTING,
                                           host="gpu-a", served_model_name="colors")
    page.goto(f"/deployments/{deployment.pk}/")
    expect(page.locator("[data-connection]")).to_have_attribute("data-state", "connected", timeout=15_000)
    log = DeploymentLog(Deployment.objects.get(pk=deployment.pk))
    log.add(["loading the model"])
    log.flush(force=True)
    expect(page.locator("#log .line")).to_have_text(["loading the model"], timeout=10_000)
    Deployment.objects.filter(pk=deployment.pk).update(status=DeploymentStatus.RUNNING, port=8123)
    log.note("Ready: serving 'colors' on 127.0.0.1:8123")
    expect(page.locator("#deployment-page h1 [data-field=status]")).to_have_text("Running", timeout=10_000)
    expect(page.locator("[data-field=where]")).to_contain_text("127.0.0.1:8123")
    assert page.locator("#chat-send").is_enabled()
    assert not [url for url in requests if "/api/" in url]  # no page polls the JSON API

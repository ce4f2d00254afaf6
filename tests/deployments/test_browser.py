"""The deployment pages in a real browser (Playwright, system Chromium): create a deployment from the
form, watch it start and its log arrive without reloading, chat with it in the playground (the
answer streams in), stop it; another user gets a 404.

Run apart from the rest of the suite, like every browser test::

    .venv/bin/python -m pytest -m e2e tests/deployments/test_browser.py
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from deployments.models import Deployment, DeploymentStatus
from tests.conftest import announce_host
from tests.web.e2e.conftest import allow_sync_orm_beside_playwright, browser, chromium_path, web_server  # noqa: F401
from tests.web.e2e.test_browser import log_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_a_deployment_is_created_watched_chatted_with_and_stopped_in_the_browser(
    browser: Any, web_server: Callable[..., str], worker: Callable[..., Any], stop_all_deployments: None,  # noqa: F811
    fake_swift: Callable[..., None], deploy_ports: tuple[int, int], local_model: Path, alice: User, bob: User,
) -> None:
    from playwright.sync_api import expect

    env = {"FINETUNE_CPU_SLOTS": "1", "FINETUNE_DEPLOY_PORTS": f"{deploy_ports[0]}-{deploy_ports[1]}"}
    base_url = web_server(**env)
    worker(**env)
    announce_host(cpu=1)
    page = log_in(browser, base_url, "alice", "alice-pass-123")

    page.goto("/deployments/?new=1")
    page.fill("#id_name", "Colors")
    page.check("input[name=source][value=model]")
    page.fill("#id_model", "fake-model")
    page.check("input[name=gpu_mode][value=cpu]")
    page.click("#new-deployment button[type=submit]")
    page.wait_for_url(re.compile(r".*/deployments/\d+/$"))
    pk = int(page.url.rstrip("/").rsplit("/", 1)[1])
    page.evaluate("() => { window.__notReloaded = true; }")
    expect(page.locator("code#endpoint")).to_have_text(f"{base_url}/api/deployments/{pk}/v1")

    badge = page.locator("#deployment-page [data-field=status]")
    expect(badge).to_have_text("Running", timeout=60_000)
    expect(page.locator("#log")).to_contain_text("Uvicorn running on http://127.0.0.1:", timeout=30_000)
    expect(page.locator("#log")).to_contain_text("[platform] Ready", timeout=30_000)

    page.fill("#chat-input", "what color is the sky")
    page.click("#chat-send")
    answer = page.locator(".chat .msg-assistant").last
    expect(answer).to_have_text("This is a fake reply to: what color is the sky", timeout=30_000)
    page.fill("#chat-input", "and the sea")
    page.press("#chat-input", "Enter")
    expect(page.locator(".chat .msg-assistant")).to_have_count(2)
    expect(page.locator(".chat .msg-assistant").last).to_have_text("This is a fake reply to: and the sea",
                                                                    timeout=30_000)
    assert Deployment.objects.get(pk=pk).request_count == 2

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-action=stop]")
    expect(badge).to_have_text("Stopped", timeout=30_000)
    assert page.evaluate("() => window.__notReloaded === true") is False  # the stop form reloads the page
    assert Deployment.objects.get(pk=pk).status == DeploymentStatus.STOPPED

    other = log_in(browser, base_url, "bob", "bob-pass-123")
    response = other.goto(f"/deployments/{pk}/")
    assert response is not None and response.status == 404

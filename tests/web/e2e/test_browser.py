"""The live portal in a real browser: a real swift run on the suite's tiny model, watched without
reloading, then the history after a reload; a second task stopped from its page; another user's
task is a 404.

Run apart from the rest of the suite: ``.venv/bin/python -m pytest -m e2e tests/web/e2e``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from tasks.models import FinetuningTask, TaskLogLine, TaskStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

BAR_WIDTH = "() => parseFloat(document.querySelector('#task-page [data-field=bar]').style.width) || 0"
CHART_POINTS = "() => Number(document.getElementById('task-page').dataset.chartPoints || 0)"
LOG_SEQS = "() => Array.from(document.querySelectorAll('#log .line')).map(n => Number(n.dataset.seq))"


def log_in(browser: Any, base_url: str, username: str, password: str) -> Any:
    context = browser.new_context(base_url=base_url)
    page = context.new_page()
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("form button[type=submit]")
    page.wait_for_url(base_url + "/")
    return page


def test_a_run_is_watched_live_then_reloaded_and_a_second_task_is_stopped(
    browser: Any,
    web_server: Callable[..., str],
    worker: Callable[..., Any],
    tiny_model: Path,
    alice: User,
    bob: User,
) -> None:
    from playwright.sync_api import expect

    env = {"FINETUNE_SMOKE_MODEL": str(tiny_model), "FINETUNE_CPU_SLOTS": "2"}
    base_url = web_server(**env)
    worker(**env)
    page = log_in(browser, base_url, "alice", "alice-pass-123")

    # One click from the smoke preset lands on the task's page.
    page.goto("/tasks/new/")
    page.fill("#id_preset-cpu-smoke-output_name", "smoke-e2e")
    page.click("#preset-cpu-smoke button[type=submit]")
    page.wait_for_url(re.compile(r".*/tasks/\d+/$"))
    task_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    page.evaluate("() => { window.__notReloaded = true; }")

    # Without a reload: running, the bar and the loss chart grow, log lines arrive, then completed.
    badge = page.locator("#task-page h1 [data-field=status]")
    expect(page.locator("[data-connection]")).to_have_attribute("data-state", "connected", timeout=15_000)
    page.wait_for_function(
        "() => ['running', 'completed'].includes(document.getElementById('task-page').dataset.status)", timeout=120_000
    )
    page.wait_for_function(f"() => ({BAR_WIDTH})() > 0 && ({CHART_POINTS})() >= 1", timeout=120_000)
    first_points = page.evaluate(CHART_POINTS)
    expect(page.locator("#log .line").first).to_be_visible(timeout=60_000)
    expect(badge).to_have_text("Completed", timeout=240_000)
    page.wait_for_function(f"() => ({CHART_POINTS})() >= 20", timeout=30_000)
    assert page.evaluate("() => window.__notReloaded") is True
    assert page.evaluate(BAR_WIDTH) == 100
    assert page.evaluate(CHART_POINTS) == 20 and first_points <= 20
    task = FinetuningTask.objects.get(pk=task_id)
    assert task.status == TaskStatus.COMPLETED, task.error_message
    page.wait_for_function(f"() => ({LOG_SEQS})().length >= {task.last_log_seq}", timeout=30_000)
    live_seqs = page.evaluate(LOG_SEQS)
    assert live_seqs == list(range(1, task.last_log_seq + 1))  # every line, once, in order
    assert page.locator("#events li.ev-completed").count() == 1

    # A reload shows the whole history from the database.
    page.reload()
    page.wait_for_function(
        f"() => ({LOG_SEQS})().length >= {task.last_log_seq} && ({CHART_POINTS})() >= 20", timeout=30_000
    )
    assert page.evaluate(LOG_SEQS) == list(range(1, task.last_log_seq + 1))
    texts = list(TaskLogLine.objects.filter(task=task).order_by("seq").values_list("text", flat=True))
    assert page.locator("#log .line").nth(len(texts) - 1).text_content() == texts[-1]
    expect(badge).to_have_text("Completed")
    assert page.locator("#events li.ev-started").count() == 1

    # A second, long task is stopped from its page (confirmation dialog, CSRF-protected POST).
    page.goto("/tasks/new/?from_preset=cpu-smoke")
    page.fill("#id_name", "long run")
    page.fill("#id_arg_max_steps", "100000")
    page.click("#custom button[type=submit]")
    page.wait_for_url(re.compile(r".*/tasks/\d+/$"))
    second_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    expect(badge).to_have_text("Running", timeout=120_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button[data-action=stop]")
    expect(badge).to_have_text("Stopped", timeout=90_000)
    assert FinetuningTask.objects.get(pk=second_id).status == TaskStatus.STOPPED

    # Bob gets a 404 for Alice's task, and the list shows him nothing of hers.
    bob_page = log_in(browser, base_url, "bob", "bob-pass-123")
    response = bob_page.goto(f"/tasks/{task_id}/")
    assert response is not None and response.status == 404
    bob_page.goto("/tasks/")
    assert bob_page.locator("tr[data-task-id]").count() == 0


def test_the_pages_render_in_chinese_in_the_browser(browser: Any, web_server: Callable[..., str], alice: User) -> None:
    base_url = web_server()
    context = browser.new_context(base_url=base_url, locale="zh-CN", extra_http_headers={"Accept-Language": "zh-CN"})
    page = context.new_page()
    page.goto("/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pass-123")
    page.click("form button[type=submit]")
    page.wait_for_url(base_url + "/")
    assert "创建第一个任务" in page.content()
    page.goto("/tasks/new/")
    assert "从预设快速开始" in page.content()
    assert page.evaluate("() => typeof window.FTP === 'object'")  # the vendored JS loaded (no CDN)

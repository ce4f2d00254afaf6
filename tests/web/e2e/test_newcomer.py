"""A newcomer's first run, in a real browser, on a CPU-only host with no configuration: sign up,
one click on the smoke preset (its tiny model is built by the platform on first use), and watch the
run complete with live curves, its checkpoints and its command line, without reloading the page.

Run apart from the rest of the suite: ``.venv/bin/python -m pytest -m e2e tests/web/e2e``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tasks.models import FinetuningTask, TaskStatus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]

CHART_POINTS = "() => Number(document.getElementById('task-page').dataset.chartPoints || 0)"


def test_a_newcomer_signs_up_and_watches_the_smoke_preset_complete_live(
    browser: Any, web_server: Callable[..., str], worker: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from playwright.sync_api import expect

    monkeypatch.delenv("FINETUNE_SMOKE_MODEL", raising=False)  # out of the box: nothing configured
    base_url = web_server()
    worker()
    page = browser.new_context(base_url=base_url).new_page()

    page.goto("/accounts/signup/")
    page.fill("#id_username", "newcomer")
    page.fill("#id_email", "newcomer@example.com")
    page.fill("#id_password1", "a-long-new-pass-753")
    page.fill("#id_password2", "a-long-new-pass-753")
    page.click("form button[type=submit]")
    page.wait_for_url(base_url + "/")

    page.goto("/tasks/new/")
    preset = page.locator("#preset-cpu-smoke")
    expect(preset).to_contain_text(re.compile("smoke test", re.IGNORECASE))
    preset.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r".*/tasks/\d+/$"))
    task_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    page.evaluate("() => { window.__notReloaded = true; }")

    # Before it starts: no checkpoint, no command line yet.
    expect(page.locator("[data-connection]")).to_have_attribute("data-state", "connected", timeout=15_000)
    badge = page.locator("#task-page h1 [data-field=status]")
    expect(badge).to_have_text("Completed", timeout=240_000)

    task = FinetuningTask.objects.get(pk=task_id)
    assert task.status == TaskStatus.COMPLETED, task.error_message
    # Every card followed the run without a reload: curves, checkpoints (with their actions), command.
    page.wait_for_function(f"() => ({CHART_POINTS})() >= {task.max_steps}", timeout=30_000)
    rows = page.locator("#checkpoints tbody tr[data-step]")
    expect(rows.first).to_be_visible(timeout=30_000)
    steps = sorted(int(s) for s in rows.evaluate_all("(rows) => rows.map(r => r.dataset.step)"))
    assert steps and steps[-1] == task.max_steps
    expect(page.locator("pre#command")).to_contain_text("sft", timeout=30_000)
    assert "--model" in (page.locator("pre#command").text_content() or "")
    expect(page.locator('[data-field="error"]')).to_be_hidden()
    assert page.evaluate("() => window.__notReloaded") is True

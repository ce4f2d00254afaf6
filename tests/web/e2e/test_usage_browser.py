"""The usage pages in a real browser: the daily chart is drawn (a Chart.js chart on a canvas of
non-zero size, with bars of non-zero height) from the same series the server computes, on the
user's page and on the staff page over all users.

Run apart from the rest of the suite: ``.venv/bin/python -m pytest -m e2e tests/web/e2e``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from gpus.models import Run, RunKind, RunStatus
from tests.web.e2e.test_browser import log_in
from usage.selectors import daily_chart_data, usage_report, usage_staff_report

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

CHART = """() => {
  const chart = window.usageChart;
  if (!chart) return null;
  const canvas = chart.canvas;
  return {
    width: canvas.width, height: canvas.height,
    labels: chart.data.labels.length,
    gpu: chart.data.datasets[0].data, cpu: chart.data.datasets[1].data,
    tallest: Math.max(...chart.getDatasetMeta(0).data.map((bar) => Math.abs(bar.height || 0))),
    days: document.getElementById("usage-page").dataset.chartDays,
  };
}"""


def finished_run(owner: User, *, hours_ago: float, hours: float, gpus: dict[str, int] | None = None,
                 cpu_slots: int = 0, kind: str = RunKind.TRAIN) -> Run:
    started = timezone.now() - timedelta(hours=hours_ago)
    return Run.objects.create(
        kind=kind, subject_id=1, owner=owner, status=RunStatus.SUCCEEDED, started_at=started,
        finished_at=started + timedelta(hours=hours), resources={"gpus": gpus or {}, "cpu_slots": cpu_slots},
    )


def test_the_usage_page_draws_the_daily_chart_of_the_users_runs(
    browser: Any, web_server: Callable[..., str], alice: User, bob: User, staff: User
) -> None:
    from playwright.sync_api import expect

    finished_run(alice, hours_ago=50, hours=3, gpus={"H100": 2})
    finished_run(alice, hours_ago=8 * 24, hours=2, gpus={"A100": 1})
    finished_run(alice, hours_ago=4 * 24, hours=5, cpu_slots=2, kind=RunKind.EXPORT)
    finished_run(bob, hours_ago=30, hours=1, gpus={"H100": 4})
    expected = daily_chart_data(usage_report(user=alice).daily)
    assert sum(expected["gpu_hours"]) == pytest.approx(8.0, abs=0.01)

    base_url = web_server()
    page = log_in(browser, base_url, "alice", "alice-pass-123")
    page.goto("/usage/")
    expect(page.locator("h1")).to_have_text("Your usage")
    expect(page.locator("nav.mainnav a[aria-current=page]")).to_have_text("Usage")
    page.wait_for_function(f"() => ({CHART})() !== null", timeout=15_000)
    chart = page.evaluate(CHART)
    assert chart["width"] > 0 and chart["height"] > 0
    assert chart["labels"] == 30 and chart["days"] == "30"
    assert chart["gpu"] == expected["gpu_hours"] and chart["cpu"] == expected["cpu_slot_hours"]
    assert chart["tallest"] > 10  # pixels: the 6 GPU-hours of two days ago are a visible bar
    expect(page.locator('[data-window="month"] [data-field=gpu_hours]')).not_to_have_text("0.0")
    expect(page.locator("[data-empty]")).to_have_count(0)

    # Staff: the same chart over all users (Bob's 4 GPU-hours included).
    everyone = daily_chart_data(usage_staff_report().daily)
    assert sum(everyone["gpu_hours"]) == pytest.approx(12.0, abs=0.01)
    page = log_in(browser, base_url, "olga", "olga-pass-123")
    page.goto("/usage/all/")
    page.wait_for_function(f"() => ({CHART})() !== null", timeout=15_000)
    chart = page.evaluate(CHART)
    assert chart["width"] > 0 and chart["height"] > 0 and chart["gpu"] == everyone["gpu_hours"]
    expect(page.locator("tr[data-user]")).to_have_count(2)

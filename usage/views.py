"""The usage pages: ``/usage/`` (the user's own) and ``/usage/all/`` (staff: every user)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.translation import gettext as _

from usage.selectors import SORT_KEYS, daily_chart_data, usage_report, usage_staff_report


def _chart_labels() -> dict[str, str]:
    return {
        "gpuHours": _("GPU-hours"),
        "cpuSlotHours": _("CPU-slot hours"),
        "hours": _("hours"),
    }


def _next_sort(key: str, *, current: str, descending: bool) -> str:
    """A column header's link: a click on the current column reverses it; another column sorts
    numbers largest first and names A to Z."""
    if key == current:
        return key if descending else f"-{key}"
    return key if key == "user" else f"-{key}"


@login_required
def usage_mine(request: HttpRequest) -> HttpResponse:
    """The user's usage: this week, this month, the quotas with their current figures, a daily
    chart of the last 30 days, GPU-hours per GPU model and storage."""
    report = usage_report(user=request.user)
    return render(request, "usage/usage_mine.html", {
        "report": report,
        "chart": {**daily_chart_data(report.daily), "labels": _chart_labels()},
    })


@login_required
def usage_all(request: HttpRequest) -> HttpResponse:
    """Every user's usage, for staff (anyone else: 404, as for a page that is not theirs)."""
    if not request.user.is_staff:
        raise Http404
    report = usage_staff_report(sort=request.GET.get("sort"))
    current = report.sort.lstrip("-")
    descending = report.sort.startswith("-")
    sort_links = {key: _next_sort(key, current=current, descending=descending) for key in SORT_KEYS}
    return render(request, "usage/usage_all.html", {
        "report": report,
        "sort_links": sort_links,
        "current_sort": current,
        "descending": descending,
        "chart": {**daily_chart_data(report.daily), "labels": _chart_labels()},
    })

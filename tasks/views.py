"""Server-rendered pages. The full portal is issue #4; this is the landing page after log-in."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from tasks import selectors
from tasks.presets import all_presets


@login_required
def home(request: HttpRequest) -> HttpResponse:
    tasks = selectors.finetuning_task_list(user=request.user)[:20]
    datasets = selectors.dataset_list(user=request.user)[:20]
    return render(request, "tasks/home.html", {"tasks": tasks, "datasets": datasets, "presets": all_presets()})

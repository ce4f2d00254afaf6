"""The GPUs page (``/gpus/``) and the queue page (``/queue/``), with their actions.

Both render the payloads of ``gpus.consumers`` (the same data their socket ``/ws/gpus/`` sends),
so the pages' JavaScript patches them in place. Changes go through the services: staff drain or
enable a GPU with ``gpus.services.gpu_set_enabled``; the owner of a waiting task (or staff) changes
its priority, holds, releases or cancels it with ``tasks.services``. Another user's task is a 404.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import get_language
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from finetune_platform.errors import ServiceValidationError
from gpus import selectors, services
from gpus.selectors import gpu_overview, queue_overview, starts_in_text
from tasks import selectors as task_selectors
from tasks import services as task_services
from tasks.models import TaskStatus


def _state_labels() -> dict[str, str]:
    return {
        "free": _("free"),
        "reserved": _("reserved"),
        "draining": _("draining"),
        "disabled": _("disabled"),
        "offline": _("offline"),
    }


def _common_labels() -> dict[str, Any]:
    """Strings the pages' JavaScript shows, in the page's language."""
    return {
        "connected": _("Live"),
        "connecting": _("Connecting…"),
        "reconnecting": _("Reconnecting…"),
        # The same formats as tasks/templatetags/task_format.py uses.
        "durations": {
            "dh": _("%(d)dd %(h)02dh"),
            "hm": _("%(h)dh %(m)02dm"),
            "ms": _("%(m)dm %(s)02ds"),
            "s": _("%(s)ds"),
        },
    }


def _error_text(exc: ServiceValidationError) -> str:
    parts: list[str] = []
    for message in exc.errors.values():
        if isinstance(message, list):
            parts.extend(str(m) for m in message)
        else:
            parts.append(str(message))
    return "; ".join(parts)


# --- GPUs ----------------------------------------------------------------------------------------
@login_required
def gpu_list(request: HttpRequest) -> HttpResponse:
    """Every GPU on every host, grouped by host, with live memory and utilization."""
    hosts = gpu_overview(user=request.user)
    gpus = [gpu for host in hosts for gpu in host["gpus"]]
    labels = {
        **_common_labels(),
        "states": _state_labels(),
        "live": _("live"),
        "offline": _("offline"),
        "hostDisabled": _("host disabled"),
        "neverSeen": _("never reported"),
        "seenAgo": _("%(when)s ago"),
        "cpuHeld": _("%(held)s of %(total)s held"),
        "noSlots": _("none"),
        "slot": _("slot %(n)s"),
        "free": _("free"),
        "noGpu": _("No GPU on this host: it runs CPU tasks on its CPU slots."),
        "confirmDrain": _("Drain GPU %(index)s on %(host)s? It takes no new task; a task running on it finishes."),
        "confirmEnable": _("Enable GPU %(index)s on %(host)s? Waiting tasks may start on it at once."),
        "summary": _("%(free)s of %(total)s GPUs free · %(live)s of %(hosts)s hosts live"),
    }
    context = {
        "hosts": hosts,
        "gpu_count": len(gpus),
        "free_count": sum(1 for gpu in gpus if gpu["state"] == "free"),
        "live_hosts": sum(1 for host in hosts if host["live"]),
        "live_labels": labels,
        "ws_language": get_language(),
    }
    return render(request, "gpus/gpu_list.html", context)


def _set_enabled(request: HttpRequest, pk: int, *, enabled: bool) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied(_("Only operators (staff) can enable or drain GPUs."))
    gpu = get_object_or_404(selectors.gpu_list(), pk=pk)
    gpu = services.gpu_set_enabled(gpu=gpu, enabled=enabled)
    where = {"index": gpu.index, "host": gpu.host.name}
    if enabled:
        messages.success(request, _("GPU %(index)s on %(host)s is enabled and takes new work.") % where)
    else:
        messages.success(
            request, _("GPU %(index)s on %(host)s is draining: it takes no new task; a task on it finishes.") % where
        )
    return redirect("gpus")


@login_required
@require_POST
def gpu_enable(request: HttpRequest, pk: int) -> HttpResponse:
    return _set_enabled(request, pk, enabled=True)


@login_required
@require_POST
def gpu_disable(request: HttpRequest, pk: int) -> HttpResponse:
    return _set_enabled(request, pk, enabled=False)


# --- the queue -----------------------------------------------------------------------------------
@login_required
def queue(request: HttpRequest) -> HttpResponse:
    """The waiting tasks in the order they start; owners (and staff) act on theirs."""
    entries = queue_overview(user=request.user)
    for entry in entries:
        entry["starts_in_text"] = starts_in_text(entry["starts_in_seconds"])
    labels = {
        **_common_labels(),
        "withinMinute": _("within a minute"),
        "inMinutes": _("in ~%(m)s min"),
        "inHours": _("in ~%(h)s h %(m)s min"),
        "inDays": _("in ~%(d)s d %(h)s h"),
        "summary": _("Waiting: %(n)s · on hold: %(held)s · yours: %(mine)s"),
        "confirmCancel": _("Cancel “%(name)s”? It leaves the queue and is marked stopped."),
    }
    context = {
        "entries": entries,
        "held_count": sum(1 for entry in entries if entry["held"]),
        "mine_count": sum(1 for entry in entries if entry["mine"]),
        "live_labels": labels,
        "ws_language": get_language(),
    }
    return render(request, "tasks/queue.html", context)


@login_required
@require_POST
def queue_priority(request: HttpRequest, pk: int) -> HttpResponse:
    task = task_selectors.finetuning_task_get(user=request.user, pk=pk)
    raw = request.POST.get("priority", "").strip()
    priority: Any
    try:
        priority = int(raw)
    except ValueError:
        priority = raw  # the service says what a priority must be
    try:
        task_services.finetuning_task_set_priority(task=task, priority=priority)
    except ServiceValidationError as exc:
        messages.error(
            request,
            _("The priority of “%(name)s” did not change: %(reason)s")
            % {"name": task.name, "reason": _error_text(exc)},
        )
    else:
        messages.success(request, _("“%(name)s” now has priority %(priority)s.") % {"name": task.name,
                                                                                     "priority": task.priority})
    return redirect("queue")


@login_required
@require_POST
def queue_hold(request: HttpRequest, pk: int) -> HttpResponse:
    task = task_selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        task_services.finetuning_task_hold(task=task)
    except ServiceValidationError as exc:
        messages.error(request, _("“%(name)s” was not held: %(reason)s") % {"name": task.name,
                                                                          "reason": _error_text(exc)})
    else:
        messages.success(request, _("“%(name)s” is on hold: it keeps its place but does not start.") % {
            "name": task.name})
    return redirect("queue")


@login_required
@require_POST
def queue_release(request: HttpRequest, pk: int) -> HttpResponse:
    task = task_selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        task = task_services.finetuning_task_release(task=task)
    except ServiceValidationError as exc:
        messages.error(request, _("“%(name)s” was not released: %(reason)s") % {"name": task.name,
                                                                              "reason": _error_text(exc)})
    else:
        if task.held:
            messages.error(request, _("“%(name)s” was not released: it is %(status)s.") % {
                "name": task.name, "status": task.get_status_display()})
        else:
            messages.success(request, _("“%(name)s” was released and may start.") % {"name": task.name})
    return redirect("queue")


@login_required
@require_POST
def queue_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    task = task_selectors.finetuning_task_get(user=request.user, pk=pk)
    task = task_services.finetuning_task_stop(task=task)
    if task.status == TaskStatus.RUNNING:
        messages.info(request, _("“%(name)s” had already started; it is being stopped.") % {"name": task.name})
    else:
        messages.success(request, _("“%(name)s” was cancelled.") % {"name": task.name})
    return redirect("queue")

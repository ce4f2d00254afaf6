"""The GPUs page (``/gpus/``) and its actions (the queue page is the tasks app's: ``tasks.views``).

It renders the payload its socket sends (``/ws/gpus/``: ``gpus.consumers``) with the same partials,
which the socket sends rendered for the page to swap in. Staff drain or enable a GPU with
``gpus.services.gpu_set_enabled``.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import get_language
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from core.labels import live_labels
from gpus import selectors, services
from gpus.selectors import gpu_overview


def _state_labels() -> dict[str, str]:
    return {
        "free": _("free"),
        "reserved": _("reserved"),
        "draining": _("draining"),
        "disabled": _("disabled"),
        "offline": _("offline"),
    }


# --- GPUs ----------------------------------------------------------------------------------------
@login_required
def gpu_list(request: HttpRequest) -> HttpResponse:
    """Every GPU on every host, grouped by host, with live memory and utilization."""
    hosts = gpu_overview(user=request.user)
    gpus = [gpu for host in hosts for gpu in host["gpus"]]
    labels = {
        **live_labels(),
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

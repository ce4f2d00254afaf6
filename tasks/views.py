"""The portal's server-rendered pages (issue #4). Thin: reads go through ``tasks.selectors`` (so
another user's task or dataset is a 404 on every page) and changes through ``tasks.services``;
the live parts are the WebSocket consumers in ``tasks.consumers``."""

from __future__ import annotations

import math
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.translation import get_language
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from core.errors import ServiceValidationError
from core.labels import live_labels, service_error_text
from core.query import KeysFirst
from tasks import selectors, services, storage
from tasks.consumers import task_state
from tasks.forms import DatasetUploadForm, GpuRequestForm, PresetTaskForm, TaskForm, apply_service_errors
from tasks.models import EventKind, FinetuningTask, TaskStatus, TaskType
from tasks.outputs import human_bytes
from tasks.presets import Preset, all_presets
from tasks.uploads import DatasetUploadLimit, too_large_message

PAGE_SIZE = 20
#: The detail page asks its socket for this many of the last log lines (the full log is a download).
LOG_TAIL = 5000
#: A failed task's error box keeps this many of the last log lines one click away.
ERROR_TAIL_LINES = 40
#: The detail page shows this many of the last events (all of them: the API's paginated events).
EVENTS_SHOWN = 100
#: ... and this many of the newest checkpoints, unless asked for all (``?checkpoints=all``).
CHECKPOINTS_SHOWN = 10


def _status_labels() -> dict[str, str]:
    return {value: str(label) for value, label in TaskStatus.choices}


def _live_labels() -> dict[str, Any]:
    """Strings the pages' JavaScript shows, in the page's language."""
    return {
        "status": _status_labels(),
        "events": {value: str(label) for value, label in EventKind.choices},
        "connected": _("Live"),
        "connecting": _("Connecting…"),
        "reconnecting": _("Reconnecting…"),
        "deleted": _("This task was deleted."),
        "paused": _("Auto-scroll paused — jump to the latest line"),
        "matches": _("%(n)s matching lines"),
        "stepOf": _("step %(step)s of %(max)s"),
        "trainLoss": _("Training loss"),
        "evalLoss": _("Evaluation loss"),
        "learningRate": _("Learning rate"),
        "step": _("Step"),
        "newTasks": _("There are new tasks."),
        # The same formats as tasks/templatetags/task_format.py uses.
        "durations": {
            "dh": _("%(d)dd %(h)02dh"),
            "hm": _("%(h)dh %(m)02dm"),
            "ms": _("%(m)dm %(s)02ds"),
            "s": _("%(s)ds"),
        },
    }


# --- dashboard and task list ---------------------------------------------------------------------
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The dashboard: counts by status, the latest tasks (live), presets and datasets."""
    tasks = list(selectors.finetuning_task_list(user=request.user)[:8])
    counts = selectors.finetuning_task_status_counts(user=request.user)
    context = {
        "tasks": tasks,
        "counts": counts,
        "active_count": sum(counts.get(s, 0) for s in (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING)),
        "total": sum(counts.values()),
        "dataset_count": selectors.dataset_list(user=request.user).count(),
        "presets": all_presets(),
        "live_labels": _live_labels(),
        "latest_id": tasks[0].pk if tasks else 0,
    }
    return render(request, "tasks/home.html", context)


@login_required
def task_list(request: HttpRequest) -> HttpResponse:
    """The user's tasks: filter by status and type, search by name, 20 a page; rows update live."""
    queryset = selectors.finetuning_task_list(user=request.user)
    status = request.GET.get("status", "")
    task_type = request.GET.get("type", "")
    query = request.GET.get("q", "").strip()
    if status in TaskStatus.values:
        queryset = queryset.filter(status=status)
    if task_type in TaskType.values:
        queryset = queryset.filter(task_type=task_type)
    if query:
        queryset = queryset.filter(
            Q(name__icontains=query) | Q(base_model__icontains=query) | Q(output_name__icontains=query)
        )
    # Keys first: a deep page walks an index, not the table (core.query.KeysFirst).
    page = Paginator(KeysFirst(queryset), PAGE_SIZE).get_page(request.GET.get("page"))
    params = request.GET.copy()
    params.pop("page", None)
    context = {
        "page": page,
        "tasks": list(page.object_list),
        "status": status,
        "task_type": task_type,
        "query": query,
        "filtered": bool(status or task_type or query),
        "statuses": TaskStatus.choices,
        "task_types": TaskType.choices,
        "querystring": params.urlencode(),
        "live_labels": _live_labels(),
        "latest_id": selectors.finetuning_task_list(user=request.user)
        .order_by("-pk")
        .values_list("pk", flat=True)
        .first()
        or 0,
    }
    return render(request, "tasks/task_list.html", context)


# --- new task ------------------------------------------------------------------------------------
def _preset_forms(request: HttpRequest, bound: PresetTaskForm | None = None) -> list[tuple[Preset, PresetTaskForm]]:
    forms_: list[tuple[Preset, PresetTaskForm]] = []
    for preset in all_presets():
        if bound is not None and bound.data.get("preset") == preset.name:
            forms_.append((preset, bound))
            continue
        initial = {"preset": preset.name, **GpuRequestForm.initial_for(dict(preset.gpu_config))}
        forms_.append((preset, PresetTaskForm(initial=initial, prefix=f"preset-{preset.name}")))
    return forms_


@login_required
@require_http_methods(["GET", "POST"])
def task_create(request: HttpRequest) -> HttpResponse:
    """Create a task from a preset (one click) or from scratch."""
    datasets = list(selectors.dataset_list(user=request.user))
    bound_preset: PresetTaskForm | None = None
    form: TaskForm
    if request.method == "POST" and request.POST.get("mode") == "preset":
        name = request.POST.get("preset_name", "")
        bound_preset = PresetTaskForm(request.POST, prefix=f"preset-{name}")
        if bound_preset.is_valid():
            try:
                task = services.finetuning_task_create_from_preset(
                    owner=request.user,
                    preset=bound_preset.cleaned_data["preset"],
                    name=bound_preset.cleaned_data.get("name") or "",
                    output_name=bound_preset.cleaned_data.get("output_name") or "",
                    gpu_config=bound_preset.gpu_config(),
                )
            except ServiceValidationError as exc:
                apply_service_errors(bound_preset, exc.errors)
            else:
                messages.success(request, _("Task “%(name)s” created.") % {"name": task.name})
                return redirect("task_detail", pk=task.pk)
        form = TaskForm(datasets=datasets)
    elif request.method == "POST":
        form = TaskForm(request.POST, datasets=datasets)
        if form.is_valid():
            try:
                task = services.finetuning_task_create(owner=request.user, **form.service_kwargs())
            except ServiceValidationError as exc:
                apply_service_errors(form, exc.errors)
            else:
                messages.success(request, _("Task “%(name)s” created.") % {"name": task.name})
                return redirect("task_detail", pk=task.pk)
    else:
        initial: dict[str, Any] = {}
        from_preset = request.GET.get("from_preset")
        for preset in all_presets():
            if preset.name == from_preset:
                initial = TaskForm.initial_from_preset(preset)
        form = TaskForm(initial=initial, datasets=datasets)
    context = {
        "form": form,
        "preset_forms": _preset_forms(request, bound_preset),
        "datasets": datasets,
        "custom_open": request.method == "POST" and bound_preset is None or bool(request.GET.get("from_preset")),
    }
    return render(request, "tasks/task_form.html", context, status=400 if request.method == "POST" else 200)


# --- one task ------------------------------------------------------------------------------------
def _task_cards_context(request: HttpRequest, task: FinetuningTask) -> dict[str, Any]:
    """What the cards that follow the task (error, details, checkpoints, exports, command line)
    are rendered from, on the page and in its live fragment."""
    # The revision first: whatever is read after it is at least as new, so the page never keeps
    # a revision newer than what it shows.
    cards_rev = selectors.task_cards_revision(task=task)
    error_tail = ""
    if task.error_message:
        error_tail = "\n".join(line.text for line in selectors.task_log_tail(task=task, lines=ERROR_TAIL_LINES))
    # Sizes are measured for the checkpoints shown only (and remembered: selectors.checkpoint_size).
    checkpoints = selectors.task_checkpoint_list(task=task)
    all_checkpoints = request.GET.get("checkpoints") == "all"
    return {
        "task": task,
        "cards_rev": cards_rev,
        "datasets": selectors.task_dataset_refs(user=request.user, task=task),
        "checkpoints": checkpoints if all_checkpoints else checkpoints[-CHECKPOINTS_SHOWN:],
        "checkpoint_count": len(checkpoints),
        "all_checkpoints": all_checkpoints,
        "exports": list(selectors.task_export_list(task=task)),
        "error_tail": error_tail,
    }


@login_required
def task_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """Status, progress, charts, the live log, events, command and outputs of one task."""
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    tail_after = max(0, task.last_log_seq - LOG_TAIL)
    events, event_count = selectors.task_events_latest(task=task, limit=EVENTS_SHOWN)
    metrics_after = selectors.task_metric_cursor(task=task)  # read before the sample: no point is missed
    context = {
        **_task_cards_context(request, task),
        "events": events,
        "event_count": event_count,
        "events_url": reverse("task-events", args=[task.pk]),
        "tail_after": tail_after,
        "metrics_after": metrics_after,
        "live_labels": _live_labels(),
        "initial_state": task_state(task),
        # The chart opens with a bounded sample of every point (not all of a long run's points).
        "chart_points": [{"kind": p.kind, "step": p.step, "loss": _finite(p.loss),
                          "learning_rate": _finite(p.learning_rate)}
                         for p in selectors.task_metric_sample(task=task)],
        "download_url": reverse("task-logs-download", args=[task.pk]),
    }
    return render(request, "tasks/task_detail.html", context)


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: the chart skips such a step, as it does a socket's ``null``."""
    return value if value is not None and math.isfinite(value) else None


@login_required
@require_GET
@never_cache
def task_cards(request: HttpRequest, pk: int) -> HttpResponse:
    """The task page's cards that follow the task, rendered by the page's own partials. The page
    fetches them when its socket sends a new cards revision (a status, checkpoint, command or export
    changed) and swaps them in."""
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    return render(request, "tasks/_task_cards.html", _task_cards_context(request, task))


@login_required
@require_POST
def task_stop(request: HttpRequest, pk: int) -> HttpResponse:
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    was_running = task.status == TaskStatus.RUNNING
    services.finetuning_task_stop(task=task)
    if was_running:
        messages.info(
            request, _("Stopping “%(name)s”: the process gets a few seconds to save and exit.") % {"name": task.name}
        )
    else:
        messages.success(request, _("“%(name)s” is stopped.") % {"name": task.name})
    return redirect("task_detail", pk=task.pk)


@login_required
@require_POST
def task_resume(request: HttpRequest, pk: int) -> HttpResponse:
    """Resume a stopped or failed task from the checkpoint chosen on the page (default: the last)."""
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        task = services.finetuning_task_resume(task=task, checkpoint=request.POST.get("checkpoint") or None)
    except ServiceValidationError as exc:
        messages.error(request, _("“%(name)s” cannot be resumed: %(reason)s") % {"name": task.name, "reason": exc})
    else:
        messages.success(request, _("“%(name)s” is back in the queue: run %(run)s resumes from %(checkpoint)s.")
                         % {"name": task.name, "run": task.run_number, "checkpoint": task.last_checkpoint})
    return redirect("task_detail", pk=task.pk)


@login_required
@require_POST
def task_export(request: HttpRequest, pk: int) -> HttpResponse:
    """Queue a merge of a checkpoint's LoRA adapters into a full model (default: the last checkpoint)."""
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        export = services.task_export_create(task=task, checkpoint=request.POST.get("checkpoint") or None)
    except ServiceValidationError as exc:
        messages.error(request, _("The export was not started: %(reason)s") % {"reason": exc})
    else:
        messages.success(request, _("Export of %(checkpoint)s queued; the merged model will be in %(path)s.")
                         % {"checkpoint": export.checkpoint_name, "path": export.output_path})
    return redirect(reverse("task_detail", args=[task.pk]) + "#exports")


@login_required
@require_POST
def task_delete(request: HttpRequest, pk: int) -> HttpResponse:
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    services.finetuning_task_delete(task=task)
    messages.success(request, _("“%(name)s” was deleted. Its model output stays on disk.") % {"name": task.name})
    return redirect("task_list")


@login_required
@require_POST
def task_outputs_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete a finished task's checkpoints and merged models (the page asks for confirmation first,
    as for every destructive action: the form's ``data-confirm``)."""
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        task = storage.task_outputs_delete(task=task)
    except ServiceValidationError as exc:
        messages.error(request, _("The outputs of “%(name)s” were not deleted: %(reason)s")
                       % {"name": task.name, "reason": service_error_text(exc)})
    else:
        messages.success(request, _("The checkpoints and merged models of “%(name)s” were deleted; its folder now "
                                    "uses %(size)s.") % {"name": task.name, "size": human_bytes(task.output_bytes)})
    return redirect("task_detail", pk=task.pk)


# --- datasets ------------------------------------------------------------------------------------
@login_required
def dataset_list(request: HttpRequest) -> HttpResponse:
    datasets = selectors.dataset_list(user=request.user)
    page = Paginator(datasets, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "tasks/dataset_list.html", {"page": page, "datasets": list(page.object_list)})


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """One uploaded dataset: what it holds (the task page links here by name)."""
    dataset = selectors.dataset_get(user=request.user, pk=pk)
    return render(request, "tasks/dataset_detail.html", {"dataset": dataset})


@csrf_exempt  # checked by _dataset_upload: the check reads request.POST, after the limit is in place
@login_required
@require_http_methods(["GET", "POST"])
def dataset_upload(request: HttpRequest) -> HttpResponse:
    """Upload a dataset; a broken file is refused with the line number and the reason next to the input,
    one over the size limit as soon as it passes it (``tasks.uploads``)."""
    return _dataset_upload(request, DatasetUploadLimit.install(request))


@csrf_protect
def _dataset_upload(request: HttpRequest, limit: DatasetUploadLimit) -> HttpResponse:
    form = DatasetUploadForm(request.POST or None, request.FILES or None)
    if limit.refused:
        form.is_valid()
        form.errors["file"] = form.error_class([too_large_message()])  # not "This field is required."
    elif request.method == "POST" and form.is_valid():
        try:
            dataset = services.dataset_create(
                owner=request.user,
                upload=form.cleaned_data["file"],
                name=form.cleaned_data.get("name") or "",
                description=form.cleaned_data.get("description") or "",
            )
        except ServiceValidationError as exc:
            apply_service_errors(form, exc.errors)
        else:
            messages.success(
                request,
                _("Dataset “%(name)s” uploaded: %(rows)s rows, %(format)s.")
                % {"name": dataset.name, "rows": dataset.rows, "format": dataset.get_format_display()},
            )
            return redirect("dataset_list")
    status = 400 if request.method == "POST" else 200
    return render(request, "tasks/dataset_upload.html", {"form": form}, status=status)


@login_required
@require_POST
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = selectors.dataset_get(user=request.user, pk=pk)
    services.dataset_delete(dataset=dataset)
    messages.success(request, _("Dataset “%(name)s” was deleted.") % {"name": dataset.name})
    return redirect("dataset_list")


# --- the queue -----------------------------------------------------------------------------------
@login_required
def queue(request: HttpRequest) -> HttpResponse:
    """The waiting tasks in the order they start; owners (and staff) act on theirs."""
    entries = selectors.queue_overview(user=request.user)
    for entry in entries:
        entry["starts_in_text"] = selectors.starts_in_text(entry["starts_in_seconds"])
    labels = {
        **live_labels(),
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
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    raw = request.POST.get("priority", "").strip()
    priority: Any
    try:
        priority = int(raw)
    except ValueError:
        priority = raw  # the service says what a priority must be
    try:
        services.finetuning_task_set_priority(task=task, priority=priority, by=request.user)
    except ServiceValidationError as exc:
        messages.error(
            request,
            _("The priority of “%(name)s” did not change: %(reason)s")
            % {"name": task.name, "reason": service_error_text(exc)},
        )
    else:
        messages.success(request, _("“%(name)s” now has priority %(priority)s.") % {"name": task.name,
                                                                                     "priority": task.priority})
    return redirect("queue")


@login_required
@require_POST
def queue_hold(request: HttpRequest, pk: int) -> HttpResponse:
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        services.finetuning_task_hold(task=task)
    except ServiceValidationError as exc:
        messages.error(request, _("“%(name)s” was not held: %(reason)s") % {"name": task.name,
                                                                          "reason": service_error_text(exc)})
    else:
        messages.success(request, _("“%(name)s” is on hold: it keeps its place but does not start.") % {
            "name": task.name})
    return redirect("queue")


@login_required
@require_POST
def queue_release(request: HttpRequest, pk: int) -> HttpResponse:
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    try:
        task = services.finetuning_task_release(task=task)
    except ServiceValidationError as exc:
        messages.error(request, _("“%(name)s” was not released: %(reason)s") % {"name": task.name,
                                                                              "reason": service_error_text(exc)})
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
    task = selectors.finetuning_task_get(user=request.user, pk=pk)
    task = services.finetuning_task_stop(task=task)
    if task.status == TaskStatus.RUNNING:
        messages.info(request, _("“%(name)s” had already started; it is being stopped.") % {"name": task.name})
    else:
        messages.success(request, _("“%(name)s” was cancelled.") % {"name": task.name})
    return redirect("queue")

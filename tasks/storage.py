"""Storage hygiene (issue 12; docs/operations.md "Storage"): measuring the disk a task's folder uses,
and deleting a finished task's outputs. What a delete removes and who may veto it: :mod:`tasks.outputs`."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from core.errors import ServiceValidationError
from tasks.models import ACTIVE_EXPORT_STATUSES, TERMINAL_STATUSES, EventKind, FinetuningTask, TaskExport, TaskStatus
from tasks.outputs import (
    deletable_outputs,
    human_bytes,
    output_guard_refusals,
    remove_output,
    task_folder,
    task_folder_bytes,
)
from tasks.publisher import publish_event

logger = logging.getLogger(__name__)

#: A running task's folder is measured again by the sweep once its last measurement is this old.
STORAGE_MEASURE_EVERY = timedelta(minutes=10)
#: At most this many running tasks are measured per sweep (each walk lists a folder's files).
STORAGE_SWEEP_BATCH = 20


def task_storage_measure(*, task: FinetuningTask) -> int:
    """Walk the task's folder (checkpoints, merged exports, logs; links not followed) and store the
    bytes in ``output_bytes`` with the time in ``output_measured_at``. Called when a run or an export
    ends, after outputs are deleted, and by the sweep for running tasks. Returns the bytes."""
    size = task_folder_bytes(task)
    now = timezone.now()
    FinetuningTask.objects.filter(pk=task.pk).update(output_bytes=size, output_measured_at=now)
    task.output_bytes, task.output_measured_at = size, now
    return size


def storage_measure_quietly(*, task_id: int) -> None:
    """Measure after a run or an export ended: a failure is logged, never the ending's problem (a
    savepoint: an export's ending calls this inside the transaction that ends its run)."""
    row = FinetuningTask.objects.filter(pk=task_id).first()
    if row is None:
        return
    try:
        with transaction.atomic():
            task_storage_measure(task=row)
    except Exception:  # noqa: BLE001 - the figure is refreshed by the next measurement
        logger.exception("could not measure the storage of task %s", task_id)


def task_storage_sweep(*, host: str) -> int:
    """Measure the running tasks on ``host`` whose figure is older than :data:`STORAGE_MEASURE_EVERY`
    (never measured first), at most :data:`STORAGE_SWEEP_BATCH` of them: the periodic sweep calls
    it on every host (``TrainingWorkload.swept``), where their folders are written. Returns how many."""
    stale = timezone.now() - STORAGE_MEASURE_EVERY
    due = (FinetuningTask.objects.filter(status=TaskStatus.RUNNING, run__host=host)
           .filter(Q(output_measured_at__isnull=True) | Q(output_measured_at__lt=stale))
           .order_by(F("output_measured_at").asc(nulls_first=True), "pk")[:STORAGE_SWEEP_BATCH])
    count = 0
    for task in due:
        task_storage_measure(task=task)
        count += 1
    return count


def outputs_deleted_text(task: FinetuningTask) -> str:
    """What resume, export and the pages say about a task whose outputs were deleted."""
    when = timezone.localtime(task.outputs_deleted_at).strftime("%Y-%m-%d %H:%M") if task.outputs_deleted_at else ""
    return _("the outputs of this task (its checkpoints and merged models) were deleted on %(when)s; there is "
             "nothing left to resume, export or deploy: create a new task to train again") % {"when": when}


def _outputs_refusal(task: FinetuningTask) -> str | None:
    """Why the task's outputs may not be deleted now, or None."""
    if task.delete_requested_at is not None:
        return _("the task is being deleted")
    if task.status not in TERMINAL_STATUSES:
        return _("the task is %(status)s; stop it first") % {
            "status": _("running") if task.status == TaskStatus.RUNNING else _("waiting to start")}
    export = TaskExport.objects.filter(task=task, status__in=ACTIVE_EXPORT_STATUSES).order_by("pk").first()
    if export is not None:
        return _("export %(export)s of %(checkpoint)s is %(status)s; wait for it to end or stop it first") % {
            "export": export.pk, "checkpoint": export.checkpoint_name, "status": export.status}
    refusals = output_guard_refusals(task)
    return "; ".join(refusals) if refusals else None


def task_outputs_delete(*, task: FinetuningTask) -> FinetuningTask:
    """Delete a finished task's checkpoints and merged exports from disk (see :mod:`tasks.outputs`)
    to free space; its record, log, metrics, events and export history stay. Refused with a 400
    naming ``outputs`` while the task runs or waits, while one of its exports is active, or while a
    guard objects (a deployment serves one of its checkpoints). ``last_checkpoint`` is cleared,
    ``outputs_deleted_at`` set (resume and export then say why they cannot), the folder measured
    again and "Outputs deleted: 1.2 GB freed" added to the timeline."""
    task.refresh_from_db()
    refused = _outputs_refusal(task)
    if refused:
        raise ServiceValidationError({"outputs": refused})
    before = task_folder_bytes(task)
    now = timezone.now()
    # The claim first: from here on resume and export refuse (``_checkpoint_for``), so no new run
    # starts from a checkpoint that is being removed.
    claimed = FinetuningTask.objects.filter(
        pk=task.pk, status__in=TERMINAL_STATUSES, delete_requested_at__isnull=True,
    ).update(outputs_deleted_at=now, last_checkpoint="")
    if not claimed:
        task.refresh_from_db()
        raise ServiceValidationError({"outputs": _outputs_refusal(task) or _("the task changed; try again")})
    root = task_folder(task)
    targets = deletable_outputs(task)
    left = [path.name for path in targets if not remove_output(path, root=root)]
    task.refresh_from_db()
    freed = max(0, before - task_storage_measure(task=task))
    message = _("Outputs deleted: %(size)s freed") % {"size": human_bytes(freed)}
    if left:
        message += " " + _("(%(n)s could not be removed: %(names)s)") % {"n": len(left), "names": ", ".join(left)}
    publish_event(task, EventKind.OUTPUTS_DELETED, message, freed_bytes=freed, removed=len(targets) - len(left))
    return task

"""Everything that changes tasks and datasets. Views, the API, admin actions and jobs call these."""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.services import account_hub_trusted
from core.errors import ServiceValidationError
from core.swift_cli.estimate import estimate_memory_gb
from core.swift_cli.training_args import TrainingArgsError, validate_training_args
from gpus.models import Lane, Run, RunKind
from gpus.placement import Request, impossible_reason
from gpus.scheduler import run_requeue
from gpus.selectors import inventory_snapshot
from gpus.services import run_create, run_set_queue_fields, run_stop, runs_delete
from tasks.command import normalize_gpu_config, task_hub_refusals, validate_dataset_specs
from tasks.dataset_formats import DatasetFormat, DatasetValidationError, validate_dataset_file
from tasks.models import (
    ACTIVE_EXPORT_STATUSES,
    PREFERENCE_TASK_TYPES,
    RESUMABLE_STATUSES,
    Dataset,
    EventKind,
    ExportStatus,
    FinetuningTask,
    TaskExport,
    TaskMetric,
    TaskStatus,
    TaskType,
    TrainType,
)
from tasks.paths import PathError, check_hub_model, datasets_dir, is_within, resolve_model, task_dir
from tasks.presets import PresetError, get_preset
from tasks.publisher import broadcast, publish_event
from tasks.quotas import check_storage, check_task_admission
from tasks.selectors import Checkpoint, task_checkpoint_default, task_checkpoint_list
from tasks.storage import outputs_deleted_text, storage_measure_quietly
from tasks.uploads import dataset_limit_bytes, too_large_message

logger = logging.getLogger(__name__)

_FINAL_EVENT = {
    TaskStatus.COMPLETED: EventKind.COMPLETED,
    TaskStatus.FAILED: EventKind.FAILED,
    TaskStatus.STOPPED: EventKind.STOPPED,
}


# --- tasks -------------------------------------------------------------------------------------
def _check_datasets_fit(owner_id: int, task_type: str, specs: list[Any]) -> None:
    """Uploaded datasets must suit the task type (hub datasets are checked by swift)."""
    formats = dict(Dataset.objects.filter(owner_id=owner_id, pk__in=[s for s in specs if isinstance(s, int)])
                   .values_list("pk", "format"))
    for pk, fmt in formats.items():
        if task_type in PREFERENCE_TASK_TYPES and fmt != DatasetFormat.PREFERENCE:
            raise ServiceValidationError({"datasets": _("dataset %(pk)s is in '%(fmt)s' format, but %(task_type)s "
                                                        "needs preference rows with a rejected_response")
                                          % {"pk": pk, "fmt": fmt, "task_type": task_type}})
        if task_type == TaskType.SFT and fmt == DatasetFormat.TEXT:
            raise ServiceValidationError({"datasets": _("dataset %(pk)s is plain text: use task_type 'pt' "
                                                        "(continued pre-training) for it, or upload conversations")
                                          % {"pk": pk}})


def finetuning_task_create(
    *,
    owner: AbstractBaseUser,
    name: str,
    base_model: str,
    datasets: Any,
    description: str = "",
    task_type: str = TaskType.SFT,
    train_type: str = TrainType.LORA,
    training_args: Any = None,
    gpu_config: Any = None,
    priority: Any = None,
    output_name: str = "",
    preset: str = "",
    auto_export: bool = False,
) -> FinetuningTask:
    """Validate a task, store it as ``pending`` and dispatch. Raises ServiceValidationError.

    ``auto_export``: when the task completes, merge its last checkpoint (LoRA/QLoRA only)."""
    errors: dict[str, Any] = {}
    name = (name or "").strip()
    if not name:
        errors["name"] = _("give the task a name")
    elif len(name) > 200:
        errors["name"] = _("at most 200 characters")
    if task_type not in TaskType.values:
        errors["task_type"] = _("must be one of: %(choices)s") % {"choices": ", ".join(TaskType.values)}
    if train_type not in TrainType.values:
        errors["train_type"] = _("must be one of: %(choices)s") % {"choices": ", ".join(TrainType.values)}
    priority = default_priority() if priority is None else priority
    if refused := _priority_refusal(priority, staff=bool(getattr(owner, "is_staff", False))):
        errors["priority"] = refused
    model = None
    hub_trusted = account_hub_trusted(user=owner)  # hub code runs on the workers (docs/security.md, C1)
    try:
        model = resolve_model(base_model)
        if model.source == "hub":
            check_hub_model(model.argument, trusted=hub_trusted)
    except PathError as exc:
        errors["base_model"] = str(exc)
    clean_datasets: list[Any] = []
    try:
        clean_datasets = validate_dataset_specs(owner.pk, datasets, hub_trusted=hub_trusted)
    except PathError as exc:
        errors["datasets"] = str(exc)
    args: dict[str, Any] = {}
    try:
        args = validate_training_args(training_args)
    except TrainingArgsError as exc:
        errors["training_args"] = exc.errors
    gpu: dict[str, Any] = {}
    try:
        gpu = normalize_gpu_config(gpu_config)
    except ValueError as exc:
        errors["gpu_config"] = str(exc)
    output_name = (output_name or "").strip()
    if len(output_name) > 200:
        errors["output_name"] = _("at most 200 characters")
    if not isinstance(auto_export, bool):
        errors["auto_export"] = _("must be true or false")
    elif auto_export and train_type == TrainType.FULL:
        errors["auto_export"] = _("a full fine-tune needs no export: its checkpoints are complete models "
                                  "(export merges LoRA/QLoRA adapters)")
    if errors:
        raise ServiceValidationError(errors)
    _check_datasets_fit(owner.pk, task_type, clean_datasets)
    assert model is not None
    estimate = estimate_memory_gb(model_source=model.source, model_path=model.argument, base_model=base_model,
                                  train_type=train_type, training_args=args)
    request, everything = Request.from_task(gpu, estimate), inventory_snapshot(everything=True)
    reason = impossible_reason(request, everything)
    if reason:
        raise ServiceValidationError({"gpu_config": _("this request can never run here: %(reason)s")
                                      % {"reason": reason}})
    with transaction.atomic():
        check_task_admission(owner=owner, request=request, hosts=everything)
        task = FinetuningTask.objects.create(
            owner=owner, name=name, description=description or "", task_type=task_type, train_type=train_type,
            priority=priority, base_model=base_model.strip(), model_source=model.source,
            model_path=model.argument, datasets=clean_datasets, training_args=args, gpu_config=gpu,
            memory_estimate_gb=estimate,
            output_name=output_name, preset=preset, auto_export=auto_export,
        )
        folder = task_dir(owner.pk, task.pk)
        task.output_path = str(folder / "output")
        task.log_file_path = str(folder / "train.log")
        task.run = _training_run(task)
        task.save(update_fields=["output_path", "log_file_path", "run"])
        publish_event(task, EventKind.CREATED, "Created" + (f" from preset {preset}" if preset else ""))
    return task


def _training_run(task: FinetuningTask) -> Run:
    """A new run of ``task`` in the training lane (the scheduler places it after the commit)."""
    return run_create(
        kind=RunKind.TRAIN, subject_id=task.pk, owner_id=task.owner_id, label=f"#{task.pk} {task.name}",
        lane=Lane.TRAIN, log_file_path=task.log_file_path, number=task.run_number, priority=task.priority,
        held=task.held, gpu_config=task.gpu_config, memory_estimate_gb=task.memory_estimate_gb,
    )


def finetuning_task_create_from_preset(
    *,
    owner: AbstractBaseUser,
    preset: str,
    name: str = "",
    description: str = "",
    output_name: str = "",
    gpu_config: Any = None,
    priority: Any = None,
    auto_export: bool = False,
) -> FinetuningTask:
    """Create a task from a preset: only the preset name is required."""
    try:
        spec = get_preset(preset)
    except PresetError as exc:
        raise ServiceValidationError({"preset": str(exc)}) from None
    return finetuning_task_create(
        owner=owner, name=name or spec.title, description=description or spec.description,
        task_type=spec.task_type, train_type=spec.train_type, base_model=spec.base_model,
        datasets=list(spec.datasets), training_args=dict(spec.training_args),
        gpu_config=gpu_config if gpu_config is not None else dict(spec.gpu_config),
        priority=priority, output_name=output_name, preset=spec.name, auto_export=auto_export,
    )


def finetuning_task_stop(*, task: FinetuningTask) -> FinetuningTask:
    """Stop a task; idempotent. A task that has not started stops at once (its reservations are
    released); a running task's supervisor is asked to stop (SIGTERM to the process group, SIGKILL
    after the grace period)."""
    with transaction.atomic():
        outcome = run_stop(run=task.run) if task.run is not None else ""
        stopped_now = outcome == "stopped" and FinetuningTask.objects.filter(
            pk=task.pk, status__in=[TaskStatus.PENDING, TaskStatus.QUEUED]
        ).update(status=TaskStatus.STOPPED)
    task.refresh_from_db()
    if stopped_now:
        publish_event(task, EventKind.STOPPED, "Stopped before it started")
    elif outcome == "requested":
        publish_event(task, EventKind.STOP_REQUESTED, "Stop requested; stopping the process group")
    return task


def finetuning_task_finish(*, task: FinetuningTask, status: str, error: str = "", exit_code: int | None = None) -> bool:
    """A task's run ended (called by its workload inside the transaction that ends the run, or by the
    reconciler for a run no supervisor will end): the task takes the final ``status``, with an event
    on its timeline. Returns False if the task was not running any more."""
    fields: dict[str, Any] = {"status": status}
    if status == TaskStatus.COMPLETED:
        fields.update(progress=100.0, eta_seconds=0.0)
    changed = FinetuningTask.objects.filter(
        pk=task.pk, status__in=[TaskStatus.QUEUED, TaskStatus.RUNNING]
    ).update(**fields)
    row = FinetuningTask.objects.filter(pk=task.pk).first()
    if row is None or not changed:
        return False
    message = {
        TaskStatus.COMPLETED: "Completed" + (f"; last checkpoint {Path(row.last_checkpoint).name}"
                                             if row.last_checkpoint else ""),
        TaskStatus.STOPPED: "Stopped on request",
        TaskStatus.FAILED: (error.splitlines() or ["Failed"])[0],
    }.get(status, status)
    publish_event(row, _FINAL_EVENT.get(status, status), message, exit_code=exit_code)
    return True


def finetuning_task_after_finish(*, task_id: int) -> None:
    """After the ending committed: measure the task's folder, then purge a task whose delete was
    waiting for its process, or start the export it asked for at creation."""
    row = FinetuningTask.objects.filter(pk=task_id).first()
    if row is None:
        return
    storage_measure_quietly(task_id=row.pk)
    if row.delete_requested_at is not None:
        finetuning_task_purge(task=row)
    elif row.status == TaskStatus.COMPLETED and row.auto_export and row.can_export:
        _auto_export(task=row)


def _auto_export(*, task: FinetuningTask) -> None:
    """Queue the export a task asked for at creation; a refusal is an event, never a failed finish."""
    try:
        task_export_create(task=task)
    except ServiceValidationError as exc:
        publish_event(task, EventKind.EXPORT_FAILED, f"The automatic export was not started: {exc}")
    except Exception:  # noqa: BLE001 - the task did complete; an export problem must not undo that
        logger.exception("automatic export of task %s could not be queued", task.pk)
        publish_event(task, EventKind.EXPORT_FAILED, "The automatic export could not be queued (see the server log).")


def default_priority() -> int:
    """The priority a task gets when it names none: 5, or the highest a user may set if lower."""
    return min(5, settings.FINETUNE_USER_MAX_PRIORITY)


def _priority_refusal(priority: Any, *, staff: bool) -> str | None:
    """Why ``priority`` is not allowed (0-10, larger first; above ``FINETUNE_USER_MAX_PRIORITY`` for
    staff only), or None."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
        return _("must be a whole number from 0 to 10 (larger runs first)")
    cap = settings.FINETUNE_USER_MAX_PRIORITY
    if priority > cap and not staff:
        return _("priorities above %(cap)s are for staff (FINETUNE_USER_MAX_PRIORITY); choose 0 to %(cap)s, "
                 "or ask an operator to raise it") % {"cap": cap}
    return None


def finetuning_task_set_priority(*, task: FinetuningTask, priority: Any, by: AbstractBaseUser) -> FinetuningTask:
    """Change a task's priority (0-10, larger first; above ``FINETUNE_USER_MAX_PRIORITY`` only when
    ``by`` is staff). Only a task that has not started yet moves in the queue; the queue is
    dispatched at once."""
    if refused := _priority_refusal(priority, staff=bool(getattr(by, "is_staff", False))):
        raise ServiceValidationError({"priority": refused})
    with transaction.atomic():
        changed = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING).update(priority=priority)
        if changed:
            run_set_queue_fields(run_id=task.run_id, priority=priority)
    task.refresh_from_db()
    if not changed:
        raise ServiceValidationError({"priority": _("the task is %(status)s; only a waiting task's priority "
                                                    "can change") % {"status": task.status}})
    publish_event(task, EventKind.PRIORITY, f"Priority set to {priority}", priority=priority)
    return task


def finetuning_task_hold(*, task: FinetuningTask) -> FinetuningTask:
    """Keep a waiting task in the queue without starting it. A task already handed to a worker
    (``queued``) goes back to waiting and its reservations are released — unless the worker has
    just claimed it, in which case it is running and only stop applies."""
    with transaction.atomic():
        held = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING, held=False).update(held=True)
        unqueued = 0
        if not held and task.run is not None and run_requeue(run=task.run, reason="", quiet=True):
            unqueued = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
                status=TaskStatus.PENDING, held=True
            )
        if held or unqueued:
            run_set_queue_fields(run_id=task.run_id, held=True)
    task.refresh_from_db()
    if not (held or unqueued):
        if task.held:
            return task
        raise ServiceValidationError({"held": _("the task is %(status)s; only a waiting task can be held")
                                      % {"status": task.status}})
    publish_event(task, EventKind.HELD, "Held: keeps its place in the queue but does not start")
    return task


def finetuning_task_release(*, task: FinetuningTask) -> FinetuningTask:
    """Let a held task start again (it kept its place in the queue)."""
    with transaction.atomic():
        released = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING, held=True).update(held=False)
        if released:
            run_set_queue_fields(run_id=task.run_id, held=False)
    task.refresh_from_db()
    if released:
        publish_event(task, EventKind.RELEASED, "Released from hold")
    return task


def finetuning_task_delete(*, task: FinetuningTask) -> None:
    """Delete a task: stop it first, then remove its log and records; the model output stays on
    disk. Idempotent. A running task disappears from lists at once and is purged when its process
    has stopped."""
    now = timezone.now()
    FinetuningTask.objects.filter(pk=task.pk, delete_requested_at__isnull=True).update(delete_requested_at=now)
    finetuning_task_stop(task=task)
    for export in TaskExport.objects.filter(task=task, status__in=ACTIVE_EXPORT_STATUSES):
        task_export_stop(export=export)
    row = FinetuningTask.objects.filter(pk=task.pk).first()
    if row is not None and row.status != TaskStatus.RUNNING:
        finetuning_task_purge(task=row)


def finetuning_task_purge(*, task: FinetuningTask) -> None:
    """Remove a finished task's log file, scratch files and database records (not its output,
    checkpoints or merged exports)."""
    folder = Path(task.log_file_path).parent if task.log_file_path else None
    if folder is not None and is_within(folder, settings.WORKSPACES_DIR):
        Path(task.log_file_path).unlink(missing_ok=True)
        shutil.rmtree(folder / "cache", ignore_errors=True)
        shutil.rmtree(folder / "exports", ignore_errors=True)  # export logs and caches; merged models stay
    export_ids = list(TaskExport.objects.filter(task=task).values_list("pk", flat=True))
    with transaction.atomic():
        runs_delete(kind=RunKind.TRAIN, subject_ids=[task.pk])
        runs_delete(kind=RunKind.EXPORT, subject_ids=export_ids)
        FinetuningTask.objects.filter(pk=task.pk).delete()
        broadcast(task, {"deleted": True})  # an open page of the task says so


# --- checkpoints: resume and export ------------------------------------------------------------
def _checkpoint_for(task: FinetuningTask, value: Any, *, checkpoints: list[Checkpoint] | None = None) -> Checkpoint:
    """The checkpoint a request names: a step (``8``, ``"8"``), a folder inside the task's output
    folder (absolute, or relative to it: ``"checkpoint-8"``, ``"v0-…/checkpoint-12"``), or ``None``
    for the task's last checkpoint. Anything else is a 400 that names ``checkpoint``."""
    if task.outputs_deleted_at is not None:
        raise ServiceValidationError({"checkpoint": outputs_deleted_text(task)})
    checkpoints = task_checkpoint_list(task=task) if checkpoints is None else checkpoints
    if not checkpoints:
        raise ServiceValidationError({"checkpoint": _("the task has no checkpoint yet (swift saves one every "
                                                      "save_steps steps and at the end of training)")})
    if value is None or value == "":
        found = task_checkpoint_default(task=task, checkpoints=checkpoints)
        assert found is not None
        return found
    steps = ", ".join(str(s) for s in sorted({c.step for c in checkpoints}))
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ServiceValidationError({"checkpoint": _("give a step number or a checkpoint folder of this task")})
    if isinstance(value, int) or re.fullmatch(r"[0-9]{1,18}", value.strip()):  # not str.isdigit: "²"
        step = int(value)
        matching = [c for c in checkpoints if c.step == step]
        if not matching:
            raise ServiceValidationError({"checkpoint": _("the task has no checkpoint at step %(step)s "
                                                          "(it has steps %(steps)s)") % {"step": step, "steps": steps}})
        return matching[-1]  # the newest save of that step (a resumed run may have saved it again)
    text = value.strip()
    output = Path(task.output_path)
    if "\x00" in text or any(ord(ch) < 32 for ch in text):
        raise ServiceValidationError({"checkpoint": _("contains control characters")})
    candidate = Path(text) if Path(text).is_absolute() else output / text
    if not is_within(candidate, output):
        raise ServiceValidationError({"checkpoint": _("%(path)s is not inside this task's output folder; "
                                                      "name one of its checkpoints (steps %(steps)s)")
                                      % {"path": repr(text), "steps": steps}})
    resolved = str(candidate.resolve())
    for checkpoint in checkpoints:
        if checkpoint.path == resolved:
            return checkpoint
    raise ServiceValidationError({"checkpoint": _("%(path)s is not a checkpoint of this task (it has steps %(steps)s)")
                                  % {"path": repr(text), "steps": steps}})


def finetuning_task_resume(*, task: FinetuningTask, checkpoint: Any = None) -> FinetuningTask:
    """Start a new run of a stopped or failed task from one of its checkpoints (default: the last).

    One conditional update moves it ``stopped/failed → pending`` with the checkpoint, the next run
    number and cleared stop/finish/error fields; in the same transaction the metric points after
    the checkpoint's step are deleted (those steps are trained again, and the new run's
    ``logging.jsonl`` reports them from step N+1). The scheduler then starts it like any task; the
    runner passes ``--resume_from_checkpoint``. Log lines keep their increasing sequence numbers.
    """
    task.refresh_from_db()
    if task.status not in RESUMABLE_STATUSES:
        raise ServiceValidationError({"status": _("the task is %(status)s; only a stopped or failed task can be "
                                                  "resumed") % {"status": task.status}})
    refused = task_hub_refusals(task)  # the owner's trust or the allow-lists may have changed since
    if refused:
        raise ServiceValidationError(refused)
    found = _checkpoint_for(task, checkpoint)
    if not (Path(found.path) / "trainer_state.json").is_file():
        raise ServiceValidationError({"checkpoint": _("%(name)s is incomplete (it has no trainer_state.json, "
                                                      "so training cannot continue from it); choose another "
                                                      "checkpoint") % {"name": found.name}})
    last_point = (TaskMetric.objects.filter(task=task, kind="train", step__lte=found.step)
                  .order_by("-step").first())
    progress = round(min(100.0, 100.0 * found.step / task.max_steps), 2) if task.max_steps else 0.0
    everything = inventory_snapshot(everything=True)
    with transaction.atomic():
        check_task_admission(owner=task.owner, request=Request.from_task(task.gpu_config, task.memory_estimate_gb),
                             hosts=everything)
        changed = FinetuningTask.objects.filter(
            pk=task.pk, status__in=RESUMABLE_STATUSES, delete_requested_at__isnull=True
        ).update(
            status=TaskStatus.PENDING, run_number=F("run_number") + 1, resume_from=found.path, run_dir="",
            last_checkpoint=found.path, current_step=found.step, progress=progress, eta_seconds=None,
            loss=last_point.loss if last_point else None,
            learning_rate=last_point.learning_rate if last_point else None,
            epoch=last_point.epoch if last_point else None, held=False, metrics={},
        )
        if not changed:
            task.refresh_from_db()
            raise ServiceValidationError({"status": _("the task is %(status)s; only a stopped or failed task can be "
                                                      "resumed") % {"status": task.status}})
        TaskMetric.objects.filter(task=task, step__gt=found.step).delete()
        task.refresh_from_db()
        task.run = _training_run(task)  # a resume is a new run of the same task
        task.save(update_fields=["run"])
        where = f" ({found.run})" if found.run else ""
        publish_event(task, EventKind.RESUMED, f"Resumed from {found.name}{where}; run {task.run_number}",
                      checkpoint=found.path, step=found.step, run=task.run_number)
    return task


def task_export_create(*, task: FinetuningTask, checkpoint: Any = None) -> TaskExport:
    """Queue ``swift export --merge_lora`` of one of a LoRA/QLoRA task's checkpoints (default: its
    last). The merged model goes to ``<checkpoint>-merged`` (a folder the server chooses, next to
    the checkpoint); the job runs on a live host's queue (no GPU is reserved: merging runs on the CPU).

    Refused with a 400 naming the field: a full fine-tune (``train_type``: nothing to merge), an
    unknown checkpoint, one already being exported, or one exported already (``checkpoint``).
    """
    if task.train_type == TrainType.FULL:
        raise ServiceValidationError({"train_type": _("this is a full fine-tune: its checkpoints are complete "
                                                      "models already, there are no LoRA adapters to merge")})
    if task.delete_requested_at is not None:
        raise ServiceValidationError({"task": _("the task is being deleted")})
    refused = task_hub_refusals(task).get("base_model")  # the merge loads the base model again
    if refused:
        raise ServiceValidationError({"base_model": refused})
    found = _checkpoint_for(task, checkpoint)
    if not (Path(found.path) / "trainer_state.json").is_file():
        # The trainer writes trainer_state.json last: without it the folder is still being written
        # (or a save was interrupted).
        raise ServiceValidationError({"checkpoint": _("%(name)s is incomplete (no trainer_state.json yet); "
                                                      "choose another checkpoint or wait for the save to finish")
                                      % {"name": found.name}})
    if not (Path(found.path) / "adapter_config.json").is_file():
        raise ServiceValidationError({"checkpoint": _("%(name)s holds no LoRA adapters (adapter_config.json "
                                                      "is missing), so there is nothing to merge")
                                      % {"name": found.name}})
    active = TaskExport.objects.filter(task=task, checkpoint=found.path, status__in=ACTIVE_EXPORT_STATUSES).first()
    if active is not None:
        raise ServiceValidationError({"checkpoint": _("%(name)s is being exported already (export %(export)s)")
                                      % {"name": found.name, "export": active.pk}})
    done = (TaskExport.objects.filter(task=task, checkpoint=found.path, status=ExportStatus.COMPLETED)
            .order_by("-pk").first())
    if done is not None and Path(done.output_path).is_dir():
        raise ServiceValidationError({"checkpoint": _("%(name)s is exported already (export %(export)s): "
                                                      "%(path)s")
                                      % {"name": found.name, "export": done.pk, "path": done.output_path}})
    try:
        with transaction.atomic():
            export = TaskExport.objects.create(
                task=task, checkpoint=found.path, step=found.step, output_path=f"{found.path}-merged",
            )
            export.log_file_path = str(task.workdir / "exports" / str(export.pk) / "export.log")
            export.run = run_create(
                kind=RunKind.EXPORT, subject_id=export.pk, owner_id=task.owner_id, lane=Lane.CPU,
                label=f"export of {found.name} (task #{task.pk} {task.name})", log_file_path=export.log_file_path,
            )
            export.save(update_fields=["log_file_path", "run"])
            publish_event(task, EventKind.EXPORT_QUEUED, f"Export of {found.name} queued: merging the LoRA "
                          "adapters into the base model", export=export.pk, checkpoint=found.path)
    except IntegrityError:  # a concurrent request queued the same checkpoint first
        raise ServiceValidationError({"checkpoint": _("%(name)s is being exported already")
                                      % {"name": found.name}}) from None
    return export


def task_export_stop(*, export: TaskExport) -> TaskExport:
    """Stop an export; idempotent. One that has not started fails at once; a running one's
    supervisor is asked to stop its process group (and the partial folder is removed)."""
    with transaction.atomic():
        outcome = run_stop(run=export.run, reason="Stopped before it started.") if export.run is not None else ""
        stopped_now = outcome == "stopped" and TaskExport.objects.filter(
            pk=export.pk, status=ExportStatus.PENDING
        ).update(status=ExportStatus.FAILED)
    export.refresh_from_db()
    if stopped_now:
        publish_event(export.task, EventKind.EXPORT_FAILED, f"Export of {export.checkpoint_name} stopped before it "
                      "started", export=export.pk)
    return export


def task_export_finish(*, export: TaskExport, status: str, error: str = "", size_bytes: int | None = None) -> bool:
    """An export's run ended (its workload calls this inside the transaction that ends the run; the
    reconciler for a run no supervisor will end): ``completed`` or ``failed``, on the task's
    timeline. Returns False if it had ended already."""
    fields: dict[str, Any] = {"status": status}
    allowed = [ExportStatus.RUNNING] if status == ExportStatus.COMPLETED else list(ACTIVE_EXPORT_STATUSES)
    if size_bytes is not None:
        fields["size_bytes"] = size_bytes
    changed = TaskExport.objects.filter(pk=export.pk, status__in=allowed).update(**fields)
    row = TaskExport.objects.filter(pk=export.pk).select_related("task").first()
    if not changed or row is None:
        return False
    storage_measure_quietly(task_id=row.task_id)  # a merged model was written, or a partial one removed
    if status == ExportStatus.COMPLETED:
        publish_event(row.task, EventKind.EXPORTED, f"Exported {row.checkpoint_name}: merged model in "
                      f"{Path(row.output_path).name}", export=row.pk, output_path=row.output_path)
    else:
        first = (error.splitlines() or ["failed"])[0]
        publish_event(row.task, EventKind.EXPORT_FAILED, f"Export of {row.checkpoint_name} failed: {first}",
                      export=row.pk)
    return True


# --- datasets ----------------------------------------------------------------------------------
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")


def dataset_create(
    *, owner: AbstractBaseUser, upload: UploadedFile, name: str = "", description: str = ""
) -> Dataset:
    """Store an uploaded file in the owner's workspace after validating it; a broken file is
    refused with the line number and the reason."""
    original = Path(upload.name or "dataset.jsonl").name
    suffix = Path(original).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ServiceValidationError({"file": _("unsupported file type '%(suffix)s': upload .jsonl, .json or .csv")
                                      % {"suffix": suffix or original}})
    # The upload views stop a larger file while it streams in (tasks.uploads); this covers the rest.
    limit = dataset_limit_bytes()
    if upload.size is not None and upload.size > limit:
        raise ServiceValidationError({"file": too_large_message()})
    name = (name or "").strip() or Path(original).stem
    if len(name) > 200:
        raise ServiceValidationError({"name": _("at most 200 characters")})
    check_storage(owner=owner, adding=upload.size or 0)
    folder = datasets_dir(owner.pk)
    folder.mkdir(parents=True, exist_ok=True)
    stem = _SAFE_NAME.sub("_", Path(original).stem)[:80] or "dataset"
    target = folder / f"{uuid.uuid4().hex[:12]}-{stem}{suffix}"
    # Written under a hidden temporary name that keeps the suffix (the validator reads the type
    # from it), renamed into place only once it is valid.
    partial = folder / f".uploading-{target.name}"
    try:
        with partial.open("wb") as handle:
            for chunk in upload.chunks():
                handle.write(chunk)
        info = validate_dataset_file(partial, max_bytes=limit, max_columns=settings.FINETUNE_MAX_DATASET_COLUMNS)
    except DatasetValidationError as exc:
        partial.unlink(missing_ok=True)
        raise ServiceValidationError({"file": str(exc)}) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(target)
    return Dataset.objects.create(
        owner=owner, name=name, description=description or "", original_filename=original, path=str(target),
        file_type=info.file_type, format=str(info.format), rows=info.rows, size_bytes=target.stat().st_size,
        columns=list(info.columns),
    )


def dataset_delete(*, dataset: Dataset) -> None:
    """Delete a dataset and its file. Tasks that used it keep their history."""
    path = Path(dataset.path)
    if is_within(path, datasets_dir(dataset.owner_id)):
        path.unlink(missing_ok=True)
    dataset.delete()

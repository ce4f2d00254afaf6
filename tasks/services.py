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
from django.db import transaction
from django.utils import timezone

from finetune_platform.errors import ServiceValidationError
from gpus.estimate import estimate_memory_gb
from gpus.placement import Request, impossible_reason
from gpus.selectors import inventory_snapshot
from gpus.services import reservations_release
from tasks.command import normalize_gpu_config, validate_dataset_specs
from tasks.dataset_formats import DatasetFormat, DatasetValidationError, validate_dataset_file
from tasks.models import (
    PREFERENCE_TASK_TYPES,
    Dataset,
    EventKind,
    FinetuningTask,
    TaskStatus,
    TaskType,
    TrainType,
)
from tasks.paths import PathError, datasets_dir, is_within, resolve_model, task_dir
from tasks.presets import PresetError, get_preset
from tasks.publisher import publish_event
from tasks.scheduler import dispatch_on_commit
from tasks.training_args import TrainingArgsError, validate_training_args

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
            raise ServiceValidationError({"datasets": f"dataset {pk} is in '{fmt}' format, but {task_type} "
                                          "needs preference rows with a rejected_response"})
        if task_type == TaskType.SFT and fmt == DatasetFormat.TEXT:
            raise ServiceValidationError({"datasets": f"dataset {pk} is plain text: use task_type 'pt' "
                                          "(continued pre-training) for it, or upload conversations"})


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
    priority: int = 5,
    output_name: str = "",
    preset: str = "",
) -> FinetuningTask:
    """Validate a task, store it as ``pending`` and dispatch. Raises ServiceValidationError."""
    errors: dict[str, Any] = {}
    name = (name or "").strip()
    if not name:
        errors["name"] = "give the task a name"
    elif len(name) > 200:
        errors["name"] = "at most 200 characters"
    if task_type not in TaskType.values:
        errors["task_type"] = f"must be one of: {', '.join(TaskType.values)}"
    if train_type not in TrainType.values:
        errors["train_type"] = f"must be one of: {', '.join(TrainType.values)}"
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
        errors["priority"] = "must be a whole number from 0 to 10 (larger runs first)"
    model = None
    try:
        model = resolve_model(base_model)
    except PathError as exc:
        errors["base_model"] = str(exc)
    clean_datasets: list[Any] = []
    try:
        clean_datasets = validate_dataset_specs(owner.pk, datasets)
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
        errors["output_name"] = "at most 200 characters"
    if errors:
        raise ServiceValidationError(errors)
    _check_datasets_fit(owner.pk, task_type, clean_datasets)
    assert model is not None
    estimate = estimate_memory_gb(model_source=model.source, model_path=model.argument, base_model=base_model,
                                  train_type=train_type, training_args=args)
    reason = impossible_reason(Request.from_task(gpu, estimate), inventory_snapshot(everything=True))
    if reason:
        raise ServiceValidationError({"gpu_config": f"this request can never run here: {reason}"})
    with transaction.atomic():
        task = FinetuningTask.objects.create(
            owner=owner, name=name, description=description or "", task_type=task_type, train_type=train_type,
            priority=priority, base_model=base_model.strip(), model_source=model.source,
            model_path=model.argument, datasets=clean_datasets, training_args=args, gpu_config=gpu,
            memory_estimate_gb=estimate,
            output_name=output_name, preset=preset,
        )
        folder = task_dir(owner.pk, task.pk)
        task.output_path = str(folder / "output")
        task.log_file_path = str(folder / "train.log")
        task.save(update_fields=["output_path", "log_file_path"])
        publish_event(task, EventKind.CREATED, "Created" + (f" from preset {preset}" if preset else ""))
        dispatch_on_commit()
    return task


def finetuning_task_create_from_preset(
    *,
    owner: AbstractBaseUser,
    preset: str,
    name: str = "",
    description: str = "",
    output_name: str = "",
    gpu_config: Any = None,
    priority: int = 5,
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
        priority=priority, output_name=output_name, preset=spec.name,
    )


def finetuning_task_stop(*, task: FinetuningTask) -> FinetuningTask:
    """Stop a task; idempotent. Pending and queued tasks stop at once; a running task's runner
    is asked to stop (SIGTERM to the process group, SIGKILL after the grace period)."""
    now = timezone.now()
    with transaction.atomic():
        stopped_now = FinetuningTask.objects.filter(
            pk=task.pk, status__in=[TaskStatus.PENDING, TaskStatus.QUEUED]
        ).update(status=TaskStatus.STOPPED, stop_requested_at=now, finished_at=now)
        if stopped_now:
            reservations_release(task_id=task.pk)
    if stopped_now:
        task.refresh_from_db()
        publish_event(task, EventKind.STOPPED, "Stopped before it started")
        dispatch_on_commit()
        return task
    requested = FinetuningTask.objects.filter(
        pk=task.pk, status=TaskStatus.RUNNING, stop_requested_at__isnull=True
    ).update(stop_requested_at=now)
    task.refresh_from_db()
    if requested:
        publish_event(task, EventKind.STOP_REQUESTED, "Stop requested; stopping the process group")
    return task


def finetuning_task_finish(*, task: FinetuningTask, status: str, exit_code: int | None, error: str = "") -> bool:
    """Move a running task to a terminal state (runner and reconciler use this). Returns False if
    it was not running any more. Releases its GPUs / CPU slot in the same transaction, purges it if
    a delete is pending, and dispatches the queue."""
    now = timezone.now()
    fields: dict[str, Any] = {"status": status, "finished_at": now, "exit_code": exit_code, "heartbeat_at": now}
    if error:
        fields["error_message"] = error
    if status == TaskStatus.COMPLETED:
        fields.update(progress=100.0, eta_seconds=0.0)
    with transaction.atomic():
        changed = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.RUNNING).update(**fields)
        reservations_release(task_id=task.pk)
    row = FinetuningTask.objects.filter(pk=task.pk).first()
    if row is None:
        return False
    if changed:
        message = {
            TaskStatus.COMPLETED: "Completed" + (f"; last checkpoint {Path(row.last_checkpoint).name}"
                                                 if row.last_checkpoint else ""),
            TaskStatus.STOPPED: "Stopped on request",
            TaskStatus.FAILED: (error.splitlines() or ["Failed"])[0],
        }.get(status, status)
        publish_event(row, _FINAL_EVENT.get(status, status), message, exit_code=exit_code)
    if row.delete_requested_at is not None:
        finetuning_task_purge(task=row)
    dispatch_on_commit()
    return bool(changed)


def finetuning_task_set_priority(*, task: FinetuningTask, priority: Any) -> FinetuningTask:
    """Change a task's priority (0-10, larger first). Only a task that has not started yet moves in
    the queue; the queue is dispatched at once."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
        raise ServiceValidationError({"priority": "must be a whole number from 0 to 10 (larger runs first)"})
    changed = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING).update(priority=priority)
    task.refresh_from_db()
    if not changed:
        raise ServiceValidationError({"priority": f"the task is {task.status}; only a waiting task's priority "
                                      "can change"})
    publish_event(task, EventKind.PRIORITY, f"Priority set to {priority}", priority=priority)
    dispatch_on_commit()
    return task


def finetuning_task_hold(*, task: FinetuningTask) -> FinetuningTask:
    """Keep a waiting task in the queue without starting it. A task already handed to a worker
    (``queued``) goes back to waiting and its reservations are released — unless the worker has
    just claimed it, in which case it is running and only stop applies."""
    with transaction.atomic():
        held = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING, held=False).update(held=True)
        unqueued = 0
        if not held:
            unqueued = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
                status=TaskStatus.PENDING, held=True, host="", master_port=None, queued_at=None
            )
            if unqueued:
                reservations_release(task_id=task.pk)
    task.refresh_from_db()
    if not (held or unqueued):
        if task.held:
            return task
        raise ServiceValidationError({"held": f"the task is {task.status}; only a waiting task can be held"})
    publish_event(task, EventKind.HELD, "Held: keeps its place in the queue but does not start")
    if unqueued:
        dispatch_on_commit()
    return task


def finetuning_task_release(*, task: FinetuningTask) -> FinetuningTask:
    """Let a held task start again (it kept its place in the queue)."""
    released = FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING, held=True).update(held=False)
    task.refresh_from_db()
    if released:
        publish_event(task, EventKind.RELEASED, "Released from hold")
        dispatch_on_commit()
    return task


def finetuning_task_delete(*, task: FinetuningTask) -> None:
    """Delete a task: stop it first, then remove its log and records; the model output stays on
    disk. Idempotent. A running task disappears from lists at once and is purged when its process
    has stopped."""
    now = timezone.now()
    FinetuningTask.objects.filter(pk=task.pk, delete_requested_at__isnull=True).update(delete_requested_at=now)
    finetuning_task_stop(task=task)
    row = FinetuningTask.objects.filter(pk=task.pk).first()
    if row is not None and row.status != TaskStatus.RUNNING:
        finetuning_task_purge(task=row)


def finetuning_task_purge(*, task: FinetuningTask) -> None:
    """Remove a finished task's log file, scratch files and database records (not its output)."""
    folder = Path(task.log_file_path).parent if task.log_file_path else None
    if folder is not None and is_within(folder, settings.WORKSPACES_DIR):
        Path(task.log_file_path).unlink(missing_ok=True)
        shutil.rmtree(folder / "cache", ignore_errors=True)
    FinetuningTask.objects.filter(pk=task.pk).delete()


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
        raise ServiceValidationError({"file": f"unsupported file type '{suffix or original}': "
                                      "upload .jsonl, .json or .csv"})
    limit = settings.FINETUNE_MAX_DATASET_MB * 1024 * 1024
    if upload.size is not None and upload.size > limit:
        raise ServiceValidationError({"file": f"the file is larger than {settings.FINETUNE_MAX_DATASET_MB} MB"})
    name = (name or "").strip() or Path(original).stem
    if len(name) > 200:
        raise ServiceValidationError({"name": "at most 200 characters"})
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
        info = validate_dataset_file(partial, max_bytes=limit)
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

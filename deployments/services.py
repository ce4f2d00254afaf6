"""Everything that changes deployments. Views, the API, the gateway, admin actions and jobs call these."""

from __future__ import annotations

import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.services import quota_limits
from core.errors import ServiceValidationError
from core.live.publish import publish
from core.swift_cli.training_args import TrainingArgsError
from deployments.command import (
    available_backends,
    check_served_model_name,
    default_served_model_name,
    estimate_inference_memory_gb,
    validate_deploy_args,
)
from deployments.logs import deployment_changed, deployment_group
from deployments.models import (
    DEPLOYMENT_ACTIVE_STATUSES,
    Deployment,
    DeploymentSource,
    DeploymentStatus,
    InferenceBackend,
)
from gpus.models import Lane, RunKind
from gpus.placement import Request, impossible_reason
from gpus.quotas import check_deployment_admission, check_gpu_request, owner_lock
from gpus.selectors import inventory_snapshot
from gpus.services import run_create, run_stop, runs_delete
from tasks.command import normalize_gpu_config, task_hub_refusals
from tasks.models import FinetuningTask, TrainType
from tasks.paths import PathError, is_within, resolve_model, workspace_dir
from tasks.selectors import task_checkpoints
from tasks.storage import outputs_deleted_text

logger = logging.getLogger(__name__)


def deployment_dir(user_id: int, deployment_id: int) -> Path:
    return workspace_dir(user_id) / "deployments" / str(int(deployment_id))


# --- what to serve ----------------------------------------------------------------------------------
def _task_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _resolve_checkpoint(task: FinetuningTask, checkpoint: Any, errors: dict[str, Any]) -> Path | None:
    """The checkpoint folder to serve: the one named (inside the task's output folder) or the task's
    last one."""
    if task.outputs_deleted_at is not None:
        errors["task"] = outputs_deleted_text(task)
        return None
    output = Path(task.output_path) if task.output_path else None
    if checkpoint not in (None, ""):
        if not isinstance(checkpoint, str) or "\x00" in checkpoint:
            errors["checkpoint"] = _("must be a checkpoint folder name such as checkpoint-100")
            return None
        candidate = Path(checkpoint.strip())
        if output is not None and not candidate.is_absolute():
            candidate = output / candidate
        if output is None or not is_within(candidate, output):
            errors["checkpoint"] = (_("%(path)s is not a checkpoint of task %(task)s: it must be a folder "
                                      "inside the task's output folder") % {"path": repr(checkpoint), "task": task.pk})
            return None
        if not candidate.is_dir():
            errors["checkpoint"] = _("task %(task)s has no checkpoint %(name)s") % {
                "task": task.pk, "name": repr(candidate.name)}
            return None
        return candidate.resolve()
    found = task.last_checkpoint or (task_checkpoints(task=task) or [""])[-1]
    if not found or output is None or not is_within(Path(found), output) or not Path(found).is_dir():
        errors["task"] = (_("task %(task)s has no checkpoint yet: deploy it once it has saved one "
                            "(name one with checkpoint)") % {"task": task.pk})
        return None
    return Path(found).resolve()


def deployment_create(
    *,
    owner: AbstractBaseUser,
    name: str,
    task: Any = None,
    checkpoint: Any = None,
    merged: bool = False,
    model: Any = None,
    backend: Any = InferenceBackend.TRANSFORMERS,
    gpu_config: Any = None,
    deploy_args: Any = None,
    served_model_name: Any = "",
) -> Deployment:
    """Validate a deployment, store it as ``pending`` and dispatch (the scheduler reserves a GPU or
    a CPU slot; that host's worker starts it). Raises ServiceValidationError naming the field."""
    errors: dict[str, Any] = {}
    name = (name or "").strip() if isinstance(name, str) else ""
    if not name:
        errors["name"] = _("give the deployment a name")
    elif len(name) > 200:
        errors["name"] = _("at most 200 characters")
    has_task, has_model = task not in (None, ""), model not in (None, "")
    if has_task and has_model:
        errors["model"] = _("give either task (serve its checkpoint) or model (a local model), not both")
    elif not has_task and not has_model:
        errors["task"] = _("name a task (its checkpoint is served) or a local model with model")

    source, path, base_model, params = DeploymentSource.MODEL, None, "", ("local", "", "")
    source_task: FinetuningTask | None = None
    extra_args: dict[str, Any] = {}
    if has_task and not has_model:
        task_id = _task_id(task)
        source_task = (FinetuningTask.objects.for_user(owner).visible().filter(pk=task_id).first()
                       if task_id is not None else None)
        if source_task is None:
            errors["task"] = _("task %(task)s does not exist") % {"task": task}
        elif refused := task_hub_refusals(source_task).get("base_model"):
            # swift deploy loads the task's hub base model again (the checkpoint's args.json names it;
            # a merged folder carries its code): today's hub policy applies (docs/security.md, C1).
            errors["task"] = refused
        else:
            ckpt = _resolve_checkpoint(source_task, checkpoint, errors)
            base_model = source_task.base_model
            params = (source_task.model_source, source_task.model_path, source_task.base_model)
            source = DeploymentSource.CHECKPOINT
            path = ckpt
            if ckpt is not None and merged:
                merged_dir = ckpt.parent / f"{ckpt.name}-merged"
                if not merged_dir.is_dir() or not is_within(merged_dir, Path(source_task.output_path)):
                    errors["merged"] = (_("%(name)s has no merged model yet (%(merged)s): export it "
                                          "first, or deploy the checkpoint's adapters (merged: false)")
                                        % {"name": ckpt.name, "merged": merged_dir.name})
                else:
                    source, path = DeploymentSource.MERGED, merged_dir.resolve()
            if source_task.train_type != TrainType.FULL:
                # A local base model swift cannot identify was trained with model_type/template; the
                # adapters' args.json carries them, a merged folder may not.
                extra_args = {k: source_task.training_args[k] for k in ("model_type", "template")
                              if source_task.training_args.get(k)}
    elif has_model and not has_task:
        if merged or checkpoint not in (None, ""):
            errors["checkpoint" if checkpoint not in (None, "") else "merged"] = _("only for a task's checkpoint")
        try:
            resolved = resolve_model(model if isinstance(model, str) else "")
        except PathError as exc:
            errors["model"] = str(exc)
        else:
            if resolved.source != "local":
                errors["model"] = _("only local model folders can be deployed: put the model under a model root "
                                    "(FINETUNE_MODEL_ROOTS) and name that folder")
            else:
                path = Path(resolved.argument)
                base_model = model.strip()
                params = ("local", resolved.argument, base_model)

    if backend in (None, ""):
        backend = InferenceBackend.TRANSFORMERS
    offered = available_backends()
    if backend not in InferenceBackend.values:
        errors["backend"] = _("must be one of: %(choices)s") % {"choices": ", ".join(InferenceBackend.values)}
    elif backend not in offered:
        errors["backend"] = _("%(backend)s is not installed on this platform (available: %(available)s)") % {
            "backend": backend, "available": ", ".join(offered)}
    gpu: dict[str, Any] = {}
    try:
        gpu = normalize_gpu_config(gpu_config)
    except ValueError as exc:
        errors["gpu_config"] = str(exc)
    if gpu.get("cpu") and backend not in (InferenceBackend.TRANSFORMERS, None, "") and "backend" not in errors:
        errors["backend"] = _("%(backend)s needs a GPU; use transformers on a CPU slot") % {"backend": backend}
    args: dict[str, Any] = {}
    try:
        args = validate_deploy_args(deploy_args)
    except TrainingArgsError as exc:
        errors["deploy_args"] = exc.errors
    served = ""
    if served_model_name not in (None, ""):
        try:
            served = check_served_model_name(served_model_name if isinstance(served_model_name, str) else "")
        except ValueError as exc:
            errors["served_model_name"] = str(exc)
    if errors:
        raise ServiceValidationError(errors)
    assert path is not None
    estimate = estimate_inference_memory_gb(model_source=params[0], model_path=params[1], base_model=params[2])
    request, everything = Request.from_task(gpu, estimate), inventory_snapshot(everything=True)
    reason = impossible_reason(request, everything)
    if reason:
        raise ServiceValidationError({"gpu_config": _("this request can never run here: %(reason)s")
                                      % {"reason": reason}})
    with transaction.atomic():
        owner_lock(owner)
        limits = quota_limits(user=owner)
        check_gpu_request(owner=owner, request=request, hosts=everything, limits=limits)
        check_deployment_admission(owner=owner, limits=limits)
        deployment = Deployment.objects.create(
            owner=owner, name=name, source=source, task=source_task, model_path=str(path), base_model=base_model,
            backend=backend, gpu_config=gpu, memory_estimate_gb=estimate, deploy_args={**extra_args, **args},
            served_model_name=served,
        )
        folder = deployment_dir(owner.pk, deployment.pk)
        deployment.log_file_path = str(folder / "deploy.log")
        deployment.served_model_name = served or default_served_model_name(name, deployment.pk)
        deployment.run = run_create(
            kind=RunKind.DEPLOY, subject_id=deployment.pk, owner_id=owner.pk, lane=Lane.DEPLOY,
            label=f"#{deployment.pk} {name}", log_file_path=deployment.log_file_path, gpu_config=gpu,
            memory_estimate_gb=estimate,
        )
        deployment.save(update_fields=["log_file_path", "served_model_name", "run"])
        deployment_changed(deployment)
    return deployment


# --- stopping and ending ----------------------------------------------------------------------------
def deployment_stop(*, deployment: Deployment, reason: str = "") -> Deployment:
    """Stop a deployment; idempotent. One that has not started stops at once (its reservation is
    released); a starting or running one's supervisor is asked to stop its process group."""
    with transaction.atomic():
        outcome = run_stop(run=deployment.run) if deployment.run is not None else ""
        if outcome == "stopped":
            Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.PENDING).update(
                status=DeploymentStatus.STOPPED, stop_reason=reason or "Stopped before it started",
            )
        elif outcome == "requested":
            Deployment.objects.filter(pk=deployment.pk).update(stop_reason=reason or "Stopped on request")
        if outcome:
            deployment_changed(deployment)
    deployment.refresh_from_db()
    return deployment


def deployment_finish(*, deployment: Deployment, status: str) -> bool:
    """A deployment's run ended (its workload calls this inside the transaction that ends the run;
    the reconciler for a run no supervisor will end): ``stopped`` or ``failed``. Its port is freed
    with the status (the port is unique only among active deployments). Returns False if it had
    ended already."""
    changed = Deployment.objects.filter(pk=deployment.pk, status__in=DEPLOYMENT_ACTIVE_STATUSES).update(status=status)
    if changed:
        deployment_changed(deployment)
    return bool(changed)


def deployment_delete(*, deployment: Deployment) -> None:
    """Delete a deployment: stop it first, then remove its log and records. Idempotent; a running
    deployment vanishes from lists at once and is purged when its process has stopped."""
    Deployment.objects.filter(pk=deployment.pk, delete_requested_at__isnull=True).update(
        delete_requested_at=timezone.now()
    )
    deployment_stop(deployment=deployment)
    row = Deployment.objects.filter(pk=deployment.pk).first()
    if row is not None and not row.is_active:
        deployment_purge(deployment=row)


def deployment_purge(*, deployment: Deployment) -> None:
    """Remove an ended deployment's folder (log, caches) and its records."""
    folder = Path(deployment.log_file_path).parent if deployment.log_file_path else None
    if folder is not None and is_within(folder, settings.WORKSPACES_DIR) and folder != settings.WORKSPACES_DIR:
        shutil.rmtree(folder, ignore_errors=True)
    with transaction.atomic():
        runs_delete(kind=RunKind.DEPLOY, subject_ids=[deployment.pk])
        Deployment.objects.filter(pk=deployment.pk).delete()
        deployment_changed(deployment)


def deployment_stop_idle(*, deployment_id: int | None = None) -> list[int]:
    """Stop running deployments nobody has called through the gateway for
    ``FINETUNE_DEPLOY_IDLE_MINUTES`` (0 = never), freeing their GPUs. Returns their ids."""
    minutes = settings.FINETUNE_DEPLOY_IDLE_MINUTES
    if not minutes:
        return []
    cutoff = timezone.now() - timedelta(minutes=minutes)
    idle = Deployment.objects.filter(status=DeploymentStatus.RUNNING, run__stop_requested_at__isnull=True).filter(
        Q(last_request_at__lt=cutoff) | Q(last_request_at__isnull=True, ready_at__lt=cutoff)
    )
    if deployment_id is not None:
        idle = idle.filter(pk=deployment_id)
    stopped = []
    for deployment in idle:
        deployment_stop(deployment=deployment, reason=f"Stopped after {minutes:g} minutes without requests")
        stopped.append(deployment.pk)
    return stopped


# --- usage through the gateway ------------------------------------------------------------------------
#: A deployment's page hears of new requests at most this often (each request is counted at once).
USAGE_NOTICE_SECONDS = 1.0
_usage_announced: dict[int, float] = {}


def _record_usage(deployment_id: int, prompt_tokens: int, completion_tokens: int) -> None:
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # A usage counter may lose its last increments if PostgreSQL itself crashes; not waiting
            # for the WAL flush takes the commit off every answer's path (several ms on most disks).
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        Deployment.objects.filter(pk=deployment_id).update(
            request_count=F("request_count") + 1,
            prompt_tokens=F("prompt_tokens") + max(0, int(prompt_tokens)),
            completion_tokens=F("completion_tokens") + max(0, int(completion_tokens)),
            last_request_at=timezone.now(),
        )
        now = time.monotonic()
        if now - _usage_announced.get(deployment_id, 0.0) >= USAGE_NOTICE_SECONDS:  # the counters on its page
            _usage_announced[deployment_id] = now
            publish(deployment_group(deployment_id), {"deployment": deployment_id})


async def deployment_record_usage(*, deployment_id: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """Count one gateway request and its tokens (an atomic F() update: concurrent requests add up)."""
    await sync_to_async(_record_usage)(deployment_id, prompt_tokens, completion_tokens)

"""Deployments: a trained model served by ``swift deploy`` behind the platform's gateway.

State machine (conditional updates in ``deployments.services`` / ``deployments.runner``)::

    pending ──scheduler reserves GPUs/CPU slot, enqueues on that host──▶ (pending, host set)
       ──worker claims──▶ starting ──/v1/models answers──▶ running ──stop / idle──▶ stopped
       │                     └────────── process died / failed to start / lost ──▶ failed
       └──stop──▶ stopped

Resources are held through :class:`gpus.models.Reservation` rows (``deployment`` set), booked by
the same dispatcher as training tasks (``tasks.scheduler``), released on every ending. The port is
held by the row itself: a conditional unique constraint makes ``(host, port)`` unique among
*active* deployments, so the status update that ends a deployment is also what frees its port.
"""

from __future__ import annotations

import shlex
from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from core.ownership import OwnedQuerySet
from gpus.models import CurrentRun


class DeploymentStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    STARTING = "starting", _("Starting")
    RUNNING = "running", _("Running")
    STOPPED = "stopped", _("Stopped")
    FAILED = "failed", _("Failed")


DEPLOYMENT_ACTIVE_STATUSES = (DeploymentStatus.PENDING, DeploymentStatus.STARTING, DeploymentStatus.RUNNING)


class DeploymentSource(models.TextChoices):
    CHECKPOINT = "checkpoint", _("Task checkpoint (LoRA adapters)")
    MERGED = "merged", _("Task checkpoint, merged")
    MODEL = "model", _("Local model")


class InferenceBackend(models.TextChoices):
    TRANSFORMERS = "transformers", "transformers"
    VLLM = "vllm", "vLLM"
    SGLANG = "sglang", "SGLang"
    LMDEPLOY = "lmdeploy", "LMDeploy"


class DeploymentQuerySet(OwnedQuerySet):
    def visible(self) -> DeploymentQuerySet:
        """Deployments not being deleted (a deleted running deployment vanishes at once)."""
        return self.filter(delete_requested_at__isnull=True)

    def active(self) -> DeploymentQuerySet:
        return self.filter(status__in=DEPLOYMENT_ACTIVE_STATUSES)


class Deployment(CurrentRun):
    """A model served by one ``swift deploy`` process group on one host, bound to that host's
    ``FINETUNE_HOST_ADDRESS`` (127.0.0.1 by default; docs/deployments.md).

    ``api_key`` is the per-deployment key swift requires; only the gateway (server side) uses it.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(_("name"), max_length=200)
    status = models.CharField(
        _("status"), max_length=16, choices=DeploymentStatus.choices, default=DeploymentStatus.PENDING,
        db_index=True,
    )
    gpu_config = models.JSONField(_("GPU configuration"), default=dict, blank=True)
    memory_estimate_gb = models.FloatField(_("estimated GPU memory (GiB)"), null=True, blank=True)
    host = models.CharField(_("host"), max_length=255, blank=True, help_text=_("Set when resources are reserved."))
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    # --- what is served --------------------------------------------------------------------------
    source = models.CharField(_("source"), max_length=16, choices=DeploymentSource.choices,
                              default=DeploymentSource.CHECKPOINT)
    task = models.ForeignKey("tasks.FinetuningTask", on_delete=models.SET_NULL, null=True, blank=True,
                             related_name="deployments", verbose_name=_("task"))
    model_path = models.CharField(_("model or checkpoint folder"), max_length=1000, blank=True)
    base_model = models.CharField(_("base model"), max_length=1000, blank=True)
    backend = models.CharField(_("inference backend"), max_length=16, choices=InferenceBackend.choices,
                               default=InferenceBackend.TRANSFORMERS)
    deploy_args = models.JSONField(_("deploy arguments"), default=dict, blank=True)
    served_model_name = models.CharField(_("served model name"), max_length=200, blank=True)

    # --- the process -----------------------------------------------------------------------------
    port = models.PositiveIntegerField(_("port"), null=True, blank=True)
    api_key = models.CharField(max_length=128, blank=True, editable=False)
    log_file_path = models.CharField(_("log file"), max_length=1000, blank=True)
    last_log_seq = models.PositiveIntegerField(default=0)
    stop_reason = models.CharField(_("stop reason"), max_length=300, blank=True)
    ready_at = models.DateTimeField(_("ready"), null=True, blank=True)
    delete_requested_at = models.DateTimeField(null=True, blank=True)

    # --- usage through the gateway ---------------------------------------------------------------
    request_count = models.PositiveBigIntegerField(_("requests"), default=0)
    prompt_tokens = models.PositiveBigIntegerField(_("prompt tokens"), default=0)
    completion_tokens = models.PositiveBigIntegerField(_("completion tokens"), default=0)
    last_request_at = models.DateTimeField(_("last request"), null=True, blank=True)

    objects = DeploymentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # One active deployment per port and host; ending a deployment frees its port.
            models.UniqueConstraint(
                fields=["host", "port"],
                condition=models.Q(port__isnull=False, status__in=["pending", "starting", "running"]),
                name="deployment_port_unique_while_active",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"

    @property
    def stopped_at(self) -> datetime | None:
        return self.run.finished_at if self.run is not None else None


    @property
    def is_active(self) -> bool:
        return self.status in DEPLOYMENT_ACTIVE_STATUSES

    @property
    def command_line(self) -> str:
        return shlex.join(self.command) if self.command else ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class DeploymentLogLine(models.Model):
    """One line of a deployment's output, with a contiguous per-deployment sequence number."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="log_lines")
    seq = models.PositiveIntegerField()
    text = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["deployment", "seq"]
        constraints = [models.UniqueConstraint(fields=["deployment", "seq"], name="deployment_log_seq")]

    def __str__(self) -> str:
        return f"{self.deployment_id}:{self.seq}"

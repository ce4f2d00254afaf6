"""Fine-tuning tasks, their datasets, and what a run leaves behind (log lines, metrics, events)."""

from __future__ import annotations

import shlex
from pathlib import Path

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from core.ownership import OwnedQuerySet
from gpus.models import CurrentRun


class TaskStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    QUEUED = "queued", _("Queued")
    RUNNING = "running", _("Running")
    COMPLETED = "completed", _("Completed")
    FAILED = "failed", _("Failed")
    STOPPED = "stopped", _("Stopped")


ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING)
TERMINAL_STATUSES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.STOPPED)
#: A task in one of these may be resumed from one of its checkpoints (a new run of the same task).
RESUMABLE_STATUSES = (TaskStatus.STOPPED, TaskStatus.FAILED)


class TaskType(models.TextChoices):
    SFT = "sft", _("Supervised fine-tuning (SFT)")
    PT = "pt", _("Continued pre-training (PT)")
    DPO = "dpo", _("DPO preference training")
    ORPO = "orpo", _("ORPO preference training")
    SIMPO = "simpo", _("SimPO preference training")
    CPO = "cpo", _("CPO preference training")


PREFERENCE_TASK_TYPES = (TaskType.DPO, TaskType.ORPO, TaskType.SIMPO, TaskType.CPO)


class TrainType(models.TextChoices):
    LORA = "lora", _("LoRA")
    QLORA = "qlora", _("QLoRA (4-bit)")
    FULL = "full", _("Full parameters")


class TaskQuerySet(OwnedQuerySet):
    def visible(self) -> TaskQuerySet:
        """Tasks not being deleted (a delete of a running task finishes after its process stops)."""
        return self.filter(delete_requested_at__isnull=True)

    def queue_order(self) -> TaskQuerySet:
        """The order tasks start in: larger priority first, then the oldest."""
        return self.order_by("-priority", "created_at", "id")


class FinetuningTask(CurrentRun):
    """One fine-tuning run of ``swift`` on a base model and datasets.

    State machine (every transition is a conditional update in ``tasks.services`` or
    ``tasks.runner``; the row is the truth)::

        pending ──dispatch──▶ queued ──worker claims──▶ running ──exit 0──────▶ completed
           │                    │                          ├──exit ≠ 0 / lost──▶ failed
           └──────stop──────────┴──────────stop────────────┴──stop (SIGTERM)──▶ stopped

    * ``pending``: accepted and waiting in the platform's queue for GPUs or a CPU slot (``held``
      tasks keep their place but are skipped; see ``tasks.scheduler`` for the order and backfill).
    * ``queued``: GPUs or a CPU slot are reserved (``gpus.Reservation`` rows) on ``host`` and a job
      has been enqueued on that host's worker; the worker's first act is an atomic claim
      ``queued → running``, so a re-delivered job is a no-op.
    * ``running``: the ``swift`` process group is alive on ``host``; ``heartbeat_at`` moves.
    * ``completed`` / ``failed`` / ``stopped``: terminal. ``error_message`` says why a task failed.
    * ``stopped`` / ``failed`` ──resume──▶ ``pending``: a new run of the same task from one of its
      checkpoints (``run_number`` + 1, ``resume_from``); its log lines, metrics and events continue
      the task's history (see ``tasks.services.finetuning_task_resume``).

    A stop of a pending or queued task is immediate; a stop of a running task sets
    ``stop_requested_at`` and the runner signals the process group. A delete of a running task
    sets ``delete_requested_at`` as well; the records go once the process is gone.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="finetuning_tasks")
    name = models.CharField(_("name"), max_length=200)
    description = models.TextField(_("description"), blank=True)
    task_type = models.CharField(_("task type"), max_length=16, choices=TaskType.choices, default=TaskType.SFT)
    train_type = models.CharField(_("train type"), max_length=16, choices=TrainType.choices, default=TrainType.LORA)
    preset = models.CharField(_("preset"), max_length=64, blank=True)
    priority = models.PositiveSmallIntegerField(
        _("priority"), default=5, validators=[MinValueValidator(0), MaxValueValidator(10)]
    )
    status = models.CharField(
        _("status"), max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING, db_index=True
    )
    progress = models.FloatField(_("progress"), default=0.0)

    # What to train on: as the user named it, and as resolved for swift.
    base_model = models.CharField(_("base model"), max_length=500)
    model_source = models.CharField(max_length=8, choices=[("hub", "hub"), ("local", "local")], default="hub")
    model_path = models.CharField(_("model argument"), max_length=1000, help_text=_("What --model receives."))
    datasets = models.JSONField(_("datasets"), default=list, help_text=_("Uploaded dataset ids and/or hub ids."))
    training_args = models.JSONField(_("training arguments"), default=dict, blank=True)
    gpu_config = models.JSONField(_("GPU configuration"), default=dict, blank=True)
    held = models.BooleanField(
        _("on hold"), default=False, help_text=_("A held task keeps its place in the queue but does not start."),
    )
    memory_estimate_gb = models.FloatField(
        _("estimated GPU memory (GiB)"), null=True, blank=True,
        help_text=_("Per GPU, from the model size and train type; None when the size is unknown."),
    )

    output_name = models.CharField(_("output name"), max_length=200, blank=True)
    output_path = models.CharField(_("output path"), max_length=1000, blank=True)
    log_file_path = models.CharField(_("log file"), max_length=1000, blank=True)

    # Runtime, written by the runner.
    current_step = models.PositiveIntegerField(_("step"), default=0)
    max_steps = models.PositiveIntegerField(_("max steps"), default=0)
    epoch = models.FloatField(_("epoch"), null=True, blank=True)
    loss = models.FloatField(_("loss"), null=True, blank=True)
    learning_rate = models.FloatField(_("learning rate"), null=True, blank=True)
    eta_seconds = models.FloatField(_("estimated time remaining (s)"), null=True, blank=True)
    last_checkpoint = models.CharField(_("last checkpoint"), max_length=1000, blank=True)
    metrics = models.JSONField(_("metrics"), default=dict, blank=True, help_text=_("Final summary from swift."))
    last_log_seq = models.PositiveIntegerField(default=0)

    # Resume and export (issue 5).
    run_number = models.PositiveIntegerField(
        _("run"), default=1, help_text=_("1 for the first run; each resume from a checkpoint adds one."),
    )
    resume_from = models.CharField(
        _("resumed from"), max_length=1000, blank=True,
        help_text=_("The checkpoint the current run resumes from (empty for a run from scratch)."),
    )
    run_dir = models.CharField(
        _("run folder"), max_length=1000, blank=True,
        help_text=_("Where the current run writes: the output folder, or the versioned folder of a resumed run."),
    )
    auto_export = models.BooleanField(
        _("export when completed"), default=False,
        help_text=_("When a LoRA/QLoRA task completes, merge its last checkpoint into a full model."),
    )

    # Storage (issue 12): bytes under the task's folder (checkpoints, merged exports, logs), measured
    # when a run or an export ends, when outputs are deleted, and by the sweep while it runs.
    output_bytes = models.PositiveBigIntegerField(_("storage used"), default=0)
    output_measured_at = models.DateTimeField(_("storage measured"), null=True, blank=True)
    outputs_deleted_at = models.DateTimeField(
        _("outputs deleted"), null=True, blank=True,
        help_text=_("When the owner deleted the checkpoints and merged models; logs, metrics and events stay."),
    )

    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    delete_requested_at = models.DateTimeField(null=True, blank=True)

    objects = TaskQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # The lists (API, seed API, pages) of one user's visible tasks, newest first: page 1 reads
            # 20 entries, a count or a deep page's offset walks this index alone (an index-only scan).
            models.Index(fields=["owner", "-created_at", "-id"], condition=models.Q(delete_requested_at__isnull=True),
                         name="task_owner_visible_newest"),
            # … filtered by status (the list page's tabs, ?status=).
            models.Index(fields=["owner", "status", "-created_at", "-id"],
                         condition=models.Q(delete_requested_at__isnull=True), name="task_owner_status_newest"),
            # Staff see every user's tasks.
            models.Index(fields=["-created_at", "-id"], condition=models.Q(delete_requested_at__isnull=True),
                         name="task_visible_newest"),
            models.Index(fields=["status", "-priority", "created_at"]),
        ]
        constraints = [
            models.CheckConstraint(condition=models.Q(priority__lte=10), name="task_priority_0_10"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"

    @property
    def host(self) -> str:
        return self.run.host if self.run is not None else ""

    @property
    def master_port(self) -> int | None:
        return self.run.master_port if self.run is not None else None


    @property
    def command_line(self) -> str:
        return shlex.join(self.command) if self.command else ""

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def elapsed_seconds(self) -> float | None:
        if not self.started_at:
            return None
        from django.utils import timezone

        end = self.finished_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def workdir(self) -> Path:
        return Path(self.log_file_path).parent if self.log_file_path else Path()

    @property
    def can_resume(self) -> bool:
        """Stopped or failed, with a checkpoint to go on from (the service re-checks the folder)."""
        return self.status in RESUMABLE_STATUSES and bool(self.last_checkpoint)

    @property
    def can_export(self) -> bool:
        """A LoRA/QLoRA task's adapters can be merged into a full model (a full fine-tune needs no merge)."""
        return self.train_type != TrainType.FULL


class TaskLogLine(models.Model):
    """One line of a run's output. ``seq`` increases by one per task with no gaps, so a reader asks
    for "everything after N" and never misses or repeats a line."""

    task = models.ForeignKey(FinetuningTask, on_delete=models.CASCADE, related_name="log_lines")
    seq = models.PositiveIntegerField()
    text = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["task", "seq"]
        constraints = [models.UniqueConstraint(fields=["task", "seq"], name="log_line_task_seq")]

    def __str__(self) -> str:
        return f"{self.task_id}:{self.seq}"


class MetricKind(models.TextChoices):
    TRAIN = "train", _("Training")
    EVAL = "eval", _("Evaluation")


class TaskMetric(models.Model):
    """One logging step of ``logging.jsonl``. Common values are columns (for charts and queries);
    every numeric value swift reported is kept in ``values`` (DPO rewards, logps, …)."""

    task = models.ForeignKey(FinetuningTask, on_delete=models.CASCADE, related_name="metric_points")
    kind = models.CharField(max_length=8, choices=MetricKind.choices, default=MetricKind.TRAIN)
    step = models.PositiveIntegerField()
    epoch = models.FloatField(null=True, blank=True)
    loss = models.FloatField(null=True, blank=True)
    learning_rate = models.FloatField(null=True, blank=True)
    grad_norm = models.FloatField(null=True, blank=True)
    token_acc = models.FloatField(null=True, blank=True)
    memory_gib = models.FloatField(null=True, blank=True)
    seconds_per_step = models.FloatField(null=True, blank=True)
    values = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["task", "step", "kind"]
        constraints = [models.UniqueConstraint(fields=["task", "kind", "step"], name="metric_task_kind_step")]
        indexes = [
            # The metrics API: a task's points by step (the unique index is by kind first).
            models.Index(fields=["task", "step", "kind"], name="metric_task_step_kind"),
            # The task page's socket: the points stored after a cursor (a point id), in id order.
            models.Index(fields=["task", "id"], name="metric_task_id"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id}:{self.kind}:{self.step}"


class EventKind(models.TextChoices):
    CREATED = "created", _("Created")
    QUEUED = "queued", _("Queued")
    REQUEUED = "requeued", _("Back in the queue")
    PRIORITY = "priority", _("Priority changed")
    HELD = "held", _("Held")
    RELEASED = "released", _("Released from hold")
    RESUMED = "resumed", _("Resumed")
    STARTED = "started", _("Started")
    CHECKPOINT = "checkpoint", _("Checkpoint saved")
    STOP_REQUESTED = "stop_requested", _("Stop requested")
    STOPPED = "stopped", _("Stopped")
    FAILED = "failed", _("Failed")
    COMPLETED = "completed", _("Completed")
    EXPORT_QUEUED = "export_queued", _("Export queued")
    EXPORTED = "exported", _("Exported")
    EXPORT_FAILED = "export_failed", _("Export failed")
    OUTPUTS_DELETED = "outputs_deleted", _("Outputs deleted")


class TaskEvent(models.Model):
    """A lifecycle event with its time, shown as the task's timeline."""

    task = models.ForeignKey(FinetuningTask, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32, choices=EventKind.choices)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["task", "created_at", "id"]

    def __str__(self) -> str:
        return f"{self.task_id}:{self.kind}"


class DatasetFormatChoice(models.TextChoices):
    MESSAGES = "messages", _("Chat messages")
    ALPACA = "alpaca", _("Alpaca (instruction/input/output)")
    QUERY_RESPONSE = "query_response", _("Query / response")
    PREFERENCE = "preference", _("Preference pairs (rejected_response)")
    TEXT = "text", _("Plain text (pre-training)")


class Dataset(models.Model):
    """A training file uploaded by its owner, validated on upload and stored in their workspace."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(_("name"), max_length=200)
    description = models.TextField(_("description"), blank=True)
    original_filename = models.CharField(max_length=255)
    path = models.CharField(max_length=1000, help_text="Absolute path in the owner's workspace.")
    file_type = models.CharField(max_length=8)
    format = models.CharField(_("format"), max_length=32, choices=DatasetFormatChoice.choices)
    rows = models.PositiveIntegerField(_("rows"))
    size_bytes = models.PositiveBigIntegerField(_("size"))
    columns = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(_("uploaded"), auto_now_add=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"


class ExportStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    RUNNING = "running", _("Running")
    COMPLETED = "completed", _("Completed")
    FAILED = "failed", _("Failed")


ACTIVE_EXPORT_STATUSES = (ExportStatus.PENDING, ExportStatus.RUNNING)


class TaskExportQuerySet(OwnedQuerySet):
    owner_field = "task__owner"


class TaskExport(CurrentRun):
    """One ``swift export --merge_lora`` of a LoRA/QLoRA task's checkpoint into a full model.

    State machine (conditional updates in ``tasks.services`` and ``tasks.exports``)::

        pending ──worker claims──▶ running ──exit 0──▶ completed
           │                          └──exit ≠ 0 / stop / lost──▶ failed
           └──────────── task deleted / worker lost ──────────────▶ failed

    ``output_path`` is absolute and chosen by the server (``<checkpoint>-merged``); a completed
    export's folder holds ``config.json`` and the merged weights, ready to deploy or download. A
    failed export's partial folder is removed.
    """

    task = models.ForeignKey(FinetuningTask, on_delete=models.CASCADE, related_name="exports")
    checkpoint = models.CharField(_("checkpoint"), max_length=1000, help_text=_("Absolute path of the checkpoint."))
    step = models.PositiveIntegerField(_("step"), null=True, blank=True)
    status = models.CharField(
        _("status"), max_length=16, choices=ExportStatus.choices, default=ExportStatus.PENDING, db_index=True
    )
    output_path = models.CharField(_("output path"), max_length=1000, help_text=_("The merged model's folder."))
    log_file_path = models.CharField(_("log file"), max_length=1000, blank=True)
    log_text = models.TextField(_("log"), blank=True, help_text=_("The last lines of swift's output."))
    size_bytes = models.PositiveBigIntegerField(_("size"), null=True, blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    objects = TaskExportQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["task", "-created_at"])]
        constraints = [
            # Two requests racing to export the same checkpoint: the second insert fails.
            models.UniqueConstraint(
                fields=["task", "checkpoint"], condition=models.Q(status__in=["pending", "running"]),
                name="export_one_active_per_checkpoint",
            ),
        ]

    def __str__(self) -> str:
        return f"export #{self.pk} of task {self.task_id}"

    @property
    def host(self) -> str:
        return self.run.host if self.run is not None else ""


    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_EXPORT_STATUSES

    @property
    def checkpoint_name(self) -> str:
        return Path(self.checkpoint).name if self.checkpoint else ""

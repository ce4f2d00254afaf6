"""The compute inventory: hosts, their GPUs and CPU slots, and who holds what.

A GPU is identified by its UUID (NVML indices are not stable across reboots). A holder books a GPU
or a CPU slot with a :class:`Reservation` row; unique constraints make a double booking impossible
at the database level, whatever the dispatchers do concurrently.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _


def stale_after() -> timedelta:
    return timedelta(seconds=settings.FINETUNE_HOST_STALE_SECONDS)


class HostQuerySet(models.QuerySet):
    """Liveness is measured with the database's clock (``Now()``), never a host's own: every host
    writes ``last_seen_at`` and compares against it with the same clock, so skew between hosts or a
    clock step on one of them does not make a healthy host look silent."""

    def live(self) -> HostQuerySet:
        """Hosts whose worker reported recently (others take no new work)."""
        return self.filter(last_seen_at__gte=Now() - stale_after())

    def with_silence(self) -> HostQuerySet:
        """Annotate ``silent_for``: how long ago the host last reported, by the database's clock
        (``None`` if it never did); :attr:`Host.is_live` and :attr:`Host.silent_seconds` read it."""
        return self.annotate(silent_for=_since("last_seen_at"))

    def with_worker_age(self) -> HostQuerySet:
        """Annotate ``silent_for`` and ``worker_for`` (how long ago its worker took the name)."""
        return self.with_silence().annotate(worker_for=_since("agent_started_at"))


def _since(field: str) -> models.Expression:
    return models.ExpressionWrapper(Now() - models.F(field), output_field=models.DurationField())


class Host(models.Model):
    """A machine running a worker. Created and refreshed by that worker's GPU agent."""

    name = models.CharField(_("name"), max_length=255, unique=True)
    gpu_backend = models.CharField(_("GPU backend"), max_length=16, default="nvml")
    gpu_error = models.TextField(_("GPU discovery problem"), blank=True)
    cpu_slots = models.PositiveSmallIntegerField(_("CPU slots"), default=0)
    enabled = models.BooleanField(_("enabled"), default=True, help_text=_("A disabled host takes no new work."))
    # Where the gateway reaches this host's model servers (its worker's FINETUNE_HOST_ADDRESS, which
    # swift deploy binds to); recorded by that worker when it claims and announces the host.
    address = models.CharField(
        _("address"), max_length=255, blank=True,
        help_text=_("The host's FINETUNE_HOST_ADDRESS: where the gateway reaches its deployments."),
    )
    last_seen_at = models.DateTimeField(_("last seen"), null=True, blank=True)
    # The worker that announces this host (``gpus.services.host_claim``): a second live worker with
    # the same name refuses to start instead of failing this one's tasks.
    agent_instance = models.CharField(
        _("worker instance"), max_length=32, blank=True,
        help_text=_("Random id of the worker announcing this host; empty after a clean stop."),
    )
    agent_pid = models.PositiveIntegerField(_("worker pid"), null=True, blank=True)
    agent_machine = models.CharField(_("worker machine"), max_length=255, blank=True,
                                     help_text=_("The machine's own host name (not FINETUNE_HOST)."))
    agent_boot = models.CharField(
        _("worker boot and pid namespace"), max_length=128, blank=True,
        help_text=_("Tells a restart on the same machine whether the recorded pid is that worker's."),
    )
    agent_started_at = models.DateTimeField(
        _("worker started"), null=True, blank=True,
        help_text=_("When that worker took the name (database clock); it counts as live from then on."),
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = HostQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def silent_seconds(self) -> float | None:
        """Seconds since the host last reported, by the database's clock; ``None`` if it never did.
        Read from the ``with_silence()`` annotation, else asked of the database (one query)."""
        if "silent_for" not in self.__dict__:
            silence = Host.objects.with_silence().filter(pk=self.pk).values_list("silent_for", flat=True)
            self.silent_for = silence.first()
        silent_for: timedelta | None = self.silent_for
        return None if silent_for is None else silent_for.total_seconds()

    @property
    def is_live(self) -> bool:
        silent = self.silent_seconds
        return silent is not None and silent < settings.FINETUNE_HOST_STALE_SECONDS


class Gpu(models.Model):
    """One physical GPU, as NVML last reported it."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField(_("index"))
    uuid = models.CharField(_("UUID"), max_length=96, unique=True)
    name = models.CharField(_("model"), max_length=128)
    memory_total_mb = models.PositiveIntegerField(_("memory total (MiB)"), default=0)
    memory_used_mb = models.PositiveIntegerField(_("memory used (MiB)"), default=0)
    utilization_pct = models.PositiveSmallIntegerField(_("utilization (%)"), default=0)
    temperature_c = models.PositiveSmallIntegerField(_("temperature (°C)"), null=True, blank=True)
    processes = models.JSONField(_("processes"), default=list, blank=True)
    present = models.BooleanField(_("present"), default=True, help_text=_("Seen in the last discovery."))
    enabled = models.BooleanField(
        _("enabled"),
        default=True,
        help_text=_("Disabled (draining): takes no new task; a running task finishes."),
    )
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        ordering = ["host__name", "index"]
        constraints = [models.UniqueConstraint(fields=["host", "index"], name="gpu_host_index")]

    def __str__(self) -> str:
        return f"{self.host.name}:{self.index} {self.name}"

    @property
    def memory_total_gb(self) -> float:
        return round(self.memory_total_mb / 1024, 1)


class RunKind(models.TextChoices):
    TRAIN = "train", _("Training")
    EXPORT = "export", _("Export")
    DEPLOY = "deploy", _("Deployment")


class RunStatus(models.TextChoices):
    PENDING = "pending", _("Waiting for resources")
    QUEUED = "queued", _("Handed to a worker")
    RUNNING = "running", _("Running")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    STOPPED = "stopped", _("Stopped")
    LOST = "lost", _("Lost (host silent)")


#: A run in one of these is not over yet.
RUN_ACTIVE_STATUSES = (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)
#: A run in one of these may hold reservations (a lost run keeps them until its host's worker reaps
#: its process, or staff release them).
RUN_HOLDING_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.LOST)
RUN_ENDED_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED)


class Lane(models.IntegerChoices):
    """The order the scheduler serves waiting runs in: deployments (interactive, few) first, then
    training in priority order with backfill, then exports on a CPU slot."""

    DEPLOY = 0, _("Deployments")
    TRAIN = 1, _("Training")
    CPU = 2, _("Exports (CPU)")


class RunQuerySet(models.QuerySet):
    def waiting(self) -> RunQuerySet:
        """Runs the scheduler may place, in the order it serves them."""
        return self.filter(status=RunStatus.PENDING, held=False, stop_requested_at__isnull=True).order_by(
            "lane", "-priority", "created_at", "id"
        )

    def with_silence(self) -> RunQuerySet:
        """Annotate ``silent_for``: how long ago the supervisor last beat, by the database's clock."""
        return self.annotate(silent_for=_since("heartbeat_at"))


class Run(models.Model):
    """One supervised process: a training run, an export or a deployment's model server.

    The workload that asked for it (a task, an export, a deployment: its *subject*, ``kind`` +
    ``subject_id``) keeps what the user sees; the run keeps how the process ran. A resumed task gets
    a new run. Life of a run (every move is a conditional update; the row is the truth)::

        pending ──scheduler reserves──▶ queued ──a supervisor claims──▶ running ──exit──▶ succeeded
           │                              │                               ├────────────▶ failed
           └────────────stop──────────────┴─────────────stop──────────────┴────────────▶ stopped
                                                     host silent ──▶ lost ──reaped / released──▶ failed

    Every write of the supervisor is conditional on ``runner_instance`` and ``status='running'``
    (fencing): a supervisor whose run was failed, stopped or lost behind its back writes nothing,
    frees nothing and stops its process. Reservations point at the run; ending it releases only its
    own. A ``lost`` run keeps them: its process may still be on the GPUs of a host that went silent.
    """

    kind = models.CharField(_("kind"), max_length=8, choices=RunKind.choices)
    subject_id = models.PositiveIntegerField(_("subject"), help_text=_("The task, export or deployment id."))
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs")
    number = models.PositiveIntegerField(_("run"), default=1, help_text=_("1, then 2 for a first resume, …"))
    label = models.CharField(_("label"), max_length=255, blank=True, help_text=_("What the GPU page names."))
    status = models.CharField(
        _("status"), max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING, db_index=True
    )
    lane = models.PositiveSmallIntegerField(_("lane"), choices=Lane.choices, default=Lane.TRAIN)
    priority = models.PositiveSmallIntegerField(_("priority"), default=5)
    held = models.BooleanField(_("on hold"), default=False)
    gpu_config = models.JSONField(_("GPU configuration"), default=dict, blank=True)
    memory_estimate_gb = models.FloatField(_("estimated GPU memory (GiB)"), null=True, blank=True)
    # Why the dispatcher passed this waiting run over (a quota), shown on its subject's page; empty
    # when it only waits for free resources. Cleared when it is booked.
    wait_reason = models.CharField(_("waiting because"), max_length=500, blank=True)

    host = models.CharField(_("host"), max_length=255, blank=True, help_text=_("Set when resources are reserved."))
    # What the run was given, recorded when it is booked (reservations are deleted when it ends, this
    # stays): ``{"gpus": {"<GPU model>": count}, "cpu_slots": n}``. Usage accounting reads it with
    # ``started_at`` / ``finished_at`` (``gpus.usage``).
    resources = models.JSONField(_("resources"), default=dict, blank=True)
    master_port = models.PositiveIntegerField(
        _("master port"), null=True, blank=True, help_text=_("torchrun rendezvous port, unique per host while active."),
    )
    runner_instance = models.CharField(
        _("supervisor"), max_length=32, blank=True, help_text=_("Random id of the supervisor that claimed the run."),
    )
    runner_pid = models.IntegerField(_("supervisor pid"), null=True, blank=True)
    pid = models.IntegerField(_("process id"), null=True, blank=True)
    process_started = models.FloatField(null=True, blank=True, help_text="psutil create_time() of the process")
    heartbeat_at = models.DateTimeField(_("heartbeat"), null=True, blank=True)
    exit_code = models.IntegerField(_("exit code"), null=True, blank=True)
    error = models.TextField(_("error"), blank=True)
    command = models.JSONField(_("command"), default=list, blank=True, help_text=_("The argv as run."))
    log_file_path = models.CharField(_("log file"), max_length=1000, blank=True)

    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    queued_at = models.DateTimeField(_("queued"), null=True, blank=True)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    stop_requested_at = models.DateTimeField(null=True, blank=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["kind", "subject_id"]),
            models.Index(fields=["status", "lane", "-priority", "created_at"]),
            models.Index(fields=["owner", "status"]),
            models.Index(fields=["finished_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.kind} run #{self.pk} ({self.label or self.subject_id})"

    @property
    def is_active(self) -> bool:
        return self.status in RUN_ACTIVE_STATUSES


class Reservation(models.Model):
    """A GPU or a CPU slot booked by a run.

    Exactly one of ``gpu`` / ``cpu_slot`` is set. Deleting the row releases the resource; ending a
    run deletes its own rows in the transaction that ends it (``gpus.services.reservations_release``),
    and a deleted run takes them along (CASCADE), so none can leak.
    """

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="reservations")
    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, null=True, blank=True, related_name="reservations")
    cpu_slot = models.PositiveSmallIntegerField(null=True, blank=True)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="reservations")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["host__name", "gpu__index", "cpu_slot"]
        constraints = [
            models.UniqueConstraint(fields=["gpu"], condition=models.Q(gpu__isnull=False), name="one_holder_per_gpu"),
            models.UniqueConstraint(
                fields=["host", "cpu_slot"], condition=models.Q(cpu_slot__isnull=False), name="one_holder_per_cpu_slot"
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(gpu__isnull=False, cpu_slot__isnull=True)
                    | models.Q(gpu__isnull=True, cpu_slot__isnull=False)
                ),
                name="reservation_gpu_xor_cpu",
            ),
        ]

    def __str__(self) -> str:
        what = f"GPU {self.gpu.index}" if self.gpu_id else f"CPU slot {self.cpu_slot}"
        return f"{self.host.name} {what} → run {self.run_id}"


class CurrentRun(models.Model):
    """What asks for runs (a task, an export, a deployment): ``run`` is its current (latest) run, and
    the run's columns read through (``task.pid``, ``export.host``, ``deployment.exit_code``) for pages,
    the API and the admin. The subject never stores them itself; writes go to the run."""

    run = models.ForeignKey(Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
                            verbose_name=_("current run"))

    class Meta:
        abstract = True

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        """Reload, current run included (Django keeps a cached relation whose key did not change)."""
        super().refresh_from_db(*args, **kwargs)
        self._state.fields_cache.pop("run", None)

    @property
    def pid(self) -> int | None:
        return self.run.pid if self.run is not None else None

    @property
    def process_started(self) -> float | None:
        return self.run.process_started if self.run is not None else None

    @property
    def runner_pid(self) -> int | None:
        return self.run.runner_pid if self.run is not None else None

    @property
    def heartbeat_at(self) -> datetime | None:
        return self.run.heartbeat_at if self.run is not None else None

    @property
    def exit_code(self) -> int | None:
        return self.run.exit_code if self.run is not None else None

    @property
    def error_message(self) -> str:
        return self.run.error if self.run is not None else ""

    @property
    def command(self) -> list[str]:
        return self.run.command if self.run is not None else []

    @property
    def queued_at(self) -> datetime | None:
        return self.run.queued_at if self.run is not None else None

    @property
    def started_at(self) -> datetime | None:
        return self.run.started_at if self.run is not None else None

    @property
    def finished_at(self) -> datetime | None:
        return self.run.finished_at if self.run is not None else None

    @property
    def stop_requested_at(self) -> datetime | None:
        return self.run.stop_requested_at if self.run is not None else None

    @property
    def wait_reason(self) -> str:
        return self.run.wait_reason if self.run is not None and self.run.status == RunStatus.PENDING else ""

    @property
    def run_status(self) -> str:
        return self.run.status if self.run is not None else ""


class LiveMessage(models.Model):
    """The live outbox of the embedded mode (no Redis): a change notice for the pages watching
    ``group``, written by ``core.live.publish`` in the same transaction as the change it announces.
    Each web process's one follower reads new rows by id and hands them to its sockets; rows older
    than a few minutes are deleted. With Redis the notices go through the channel layer instead."""

    id = models.BigAutoField(primary_key=True)
    group = models.CharField(max_length=100)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.group} #{self.pk}"

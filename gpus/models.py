"""The compute inventory: hosts, their GPUs and CPU slots, and who holds what.

A GPU is identified by its UUID (NVML indices are not stable across reboots). A holder books a GPU
or a CPU slot with a :class:`Reservation` row; unique constraints make a double booking impossible
at the database level, whatever the dispatchers do concurrently.
"""

from __future__ import annotations

from datetime import timedelta

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


class Reservation(models.Model):
    """A GPU or a CPU slot booked by a task or a deployment (the holder).

    Exactly one of ``gpu`` / ``cpu_slot`` and exactly one of ``task`` / ``deployment`` is set.
    Deleting the row releases the resource; the holder's ending deletes it (``gpus.services
    .reservations_release``) and a deleted holder takes it along (CASCADE), so none can leak.
    """

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="reservations")
    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, null=True, blank=True, related_name="reservations")
    cpu_slot = models.PositiveSmallIntegerField(null=True, blank=True)
    task = models.ForeignKey(
        "tasks.FinetuningTask", on_delete=models.CASCADE, null=True, blank=True, related_name="reservations"
    )
    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, null=True, blank=True, related_name="reservations"
    )
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
            models.CheckConstraint(
                condition=(
                    models.Q(task__isnull=False, deployment__isnull=True)
                    | models.Q(task__isnull=True, deployment__isnull=False)
                ),
                name="reservation_one_holder",
            ),
        ]

    def __str__(self) -> str:
        what = f"GPU {self.gpu.index}" if self.gpu_id else f"CPU slot {self.cpu_slot}"
        holder = f"task {self.task_id}" if self.task_id else f"deployment {self.deployment_id}"
        return f"{self.host.name} {what} → {holder}"

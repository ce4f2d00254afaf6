"""Give every task, export and deployment a run holding its runtime columns, and point the
reservations at runs instead of their holders."""

import django.db.models.deletion
from django.db import migrations, models

_TASK = {"pending": "pending", "queued": "queued", "running": "running", "completed": "succeeded",
         "failed": "failed", "stopped": "stopped"}
_EXPORT = {"pending": "pending", "running": "running", "completed": "succeeded", "failed": "failed"}
_DEPLOYMENT = {"starting": "running", "running": "running", "stopped": "stopped", "failed": "failed"}
_COMMON = ("pid", "process_started", "runner_pid", "exit_code", "command", "started_at", "stop_requested_at")


def _run(Run, *, kind, subject, status, label, lane, **extra):
    fields = {name: getattr(subject, name) for name in _COMMON}
    run = Run.objects.create(
        kind=kind, subject_id=subject.pk, label=label[:255], status=status, lane=lane, error=subject.error_message,
        log_file_path=subject.log_file_path, **fields, **extra,
    )
    Run.objects.filter(pk=run.pk).update(created_at=subject.created_at)
    return run


def forwards(apps, schema_editor):
    Run = apps.get_model("gpus", "Run")
    Reservation = apps.get_model("gpus", "Reservation")
    Task = apps.get_model("tasks", "FinetuningTask")
    Export = apps.get_model("tasks", "TaskExport")
    Deployment = apps.get_model("deployments", "Deployment")
    for task in Task.objects.all().iterator():
        run = _run(Run, kind="train", subject=task, status=_TASK.get(task.status, "failed"),
                   label=f"#{task.pk} {task.name}", lane=1, owner_id=task.owner_id, number=task.run_number,
                   priority=task.priority, held=task.held, gpu_config=task.gpu_config,
                   memory_estimate_gb=task.memory_estimate_gb, host=task.host, master_port=task.master_port,
                   heartbeat_at=task.heartbeat_at, queued_at=task.queued_at, finished_at=task.finished_at)
        Task.objects.filter(pk=task.pk).update(run=run)
        Reservation.objects.filter(task_id=task.pk).update(run=run)
    for export in Export.objects.select_related("task").iterator():
        run = _run(Run, kind="export", subject=export, status=_EXPORT.get(export.status, "failed"),
                   label=f"export #{export.pk} of task #{export.task_id}", lane=2, owner_id=export.task.owner_id,
                   host=export.host if export.status == "running" else "", finished_at=export.finished_at)
        Export.objects.filter(pk=export.pk).update(run=run)
    for deployment in Deployment.objects.all().iterator():
        status = _DEPLOYMENT.get(deployment.status)
        if status is None:  # pending: placed (a reservation and a job) or still waiting
            status = "queued" if deployment.host else "pending"
        run = _run(Run, kind="deploy", subject=deployment, status=status, label=f"#{deployment.pk} {deployment.name}",
                   lane=0, owner_id=deployment.owner_id, gpu_config=deployment.gpu_config,
                   memory_estimate_gb=deployment.memory_estimate_gb, host=deployment.host,
                   heartbeat_at=deployment.heartbeat_at, finished_at=deployment.stopped_at)
        Deployment.objects.filter(pk=deployment.pk).update(run=run)
        Reservation.objects.filter(deployment_id=deployment.pk).update(run=run)
    Reservation.objects.filter(run__isnull=True).delete()  # a holder-less row cannot exist; be sure


class Migration(migrations.Migration):

    dependencies = [
        ("gpus", "0004_run"),
        ("tasks", "0005_run"),
        ("deployments", "0003_run"),
    ]

    operations = [
        migrations.RunPython(forwards, migrations.RunPython.noop),
        migrations.RemoveConstraint(model_name="reservation", name="reservation_one_holder"),
        migrations.RemoveField(model_name="reservation", name="deployment"),
        migrations.RemoveField(model_name="reservation", name="task"),
        migrations.AlterField(
            model_name="reservation",
            name="run",
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="reservations",
                                    to="gpus.run"),
        ),
    ]

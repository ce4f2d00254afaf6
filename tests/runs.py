"""What a worker process does with a job, for tests that supervise runs in-process: the subject's
current run, claimed and supervised to its end by the one supervisor (``gpus.jobs.run``)."""

from __future__ import annotations

from deployments.models import Deployment
from gpus import supervisor
from gpus.models import Reservation, Run
from gpus.scheduler import dispatch
from tasks.models import FinetuningTask, TaskExport


def current_run(model: type[FinetuningTask] | type[TaskExport] | type[Deployment], pk: int) -> Run:
    return Run.objects.get(pk=model.objects.values_list("run_id", flat=True).get(pk=pk))


def run_task(task_id: int) -> str:
    """Supervise a queued task's current run (``tasks.jobs.run_task`` before runs existed)."""
    return supervisor.run_job(current_run(FinetuningTask, task_id).pk)


def run_export(export_id: int) -> str:
    return supervisor.run_job(current_run(TaskExport, export_id).pk)


def run_deployment(deployment_id: int) -> str:
    return supervisor.run_job(current_run(Deployment, deployment_id).pk)


def update_run(subject: FinetuningTask | TaskExport | Deployment, **fields: object) -> int:
    """Change columns of a subject's current run (tests that stage a state)."""
    return Run.objects.filter(pk=type(subject).objects.values_list("run_id", flat=True).get(pk=subject.pk)).update(
        **fields
    )


_KINDS = {FinetuningTask: "train", TaskExport: "export", Deployment: "deploy"}


def stage_run(subject: FinetuningTask | TaskExport | Deployment, **fields: object) -> Run:
    """Give a subject written directly (no scheduler, no supervisor) a current run with ``fields``
    (status ``running`` unless given), for tests of the reconciler and the supervisor."""
    fields.setdefault("status", "running")
    owner_id = subject.task.owner_id if isinstance(subject, TaskExport) else subject.owner_id
    run = Run.objects.create(kind=_KINDS[type(subject)], subject_id=subject.pk, owner_id=owner_id,
                             label=f"#{subject.pk}", **fields)
    subject.run = run
    subject.save(update_fields=["run"])
    return run


def stage_task(owner: object, *, status: str = "running", name: str = "staged", **run_fields: object) -> FinetuningTask:
    """A task row in ``status`` with a current training run (``run_fields``; status running unless
    given), written directly for tests of the reconciler."""
    task = FinetuningTask.objects.create(owner=owner, name=name, base_model="x/y", model_path="x/y", status=status)
    stage_run(task, **run_fields)
    return task


def end_run(subject: FinetuningTask | TaskExport | Deployment, status: str = "succeeded") -> None:
    """End a subject's current run as its supervisor would (status, reservations released)."""
    run = current_run(type(subject), subject.pk)
    Run.objects.filter(pk=run.pk).update(status=status)
    Reservation.objects.filter(run_id=run.pk).delete()


def run_to_end(task: FinetuningTask) -> FinetuningTask:
    """Dispatch (the on-commit dispatch does not run inside a test transaction) and run the task here."""
    dispatch()
    task.refresh_from_db()
    assert task.status == "queued", task.status
    run_task(task.pk)
    task.refresh_from_db()
    return task

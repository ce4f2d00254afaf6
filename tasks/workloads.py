"""The two kinds of run a task asks for, as workloads of the one supervisor (:mod:`gpus.supervisor`).

* **Training** (:class:`TrainingWorkload`): ``swift sft|pt|rlhf`` on the GPUs or CPU slot the run
  holds. Its lines, metrics (``logging.jsonl``), checkpoints and events go through the one
  :class:`~tasks.publisher.ProgressPublisher`, whose every write is fenced on the run. A resumed run
  (``task.resume_from``) passes ``--resume_from_checkpoint``; swift then writes into a new versioned
  folder ``output/v<N>-…`` whose ``logging.jsonl`` starts at step N+1: the workload finds that
  folder (swift's ``output_dir: …`` line, else the ``v*-*`` folder that appeared after the launch)
  and follows it, and ``train.log`` is read from where the earlier runs ended, so log sequence
  numbers and metric steps continue without repeats.
* **Export** (:class:`ExportWorkload`): ``swift export --merge_lora`` of one checkpoint on a CPU slot;
  the stored log keeps its last lines, a failed export's partial folder is removed, and a completed
  one must have written ``config.json``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models.functions import Now
from django.urls import reverse

from core.swift_cli.env import LaunchError
from core.swift_cli.failures import explain_failure
from core.swift_cli.output import JsonlTail, checkpoint_saved, interpret_logging_record
from gpus.models import Run, RunStatus
from gpus.outage import Backoff, database_failed
from gpus.workloads import Launch, Outcome, Workload, holder_view, register
from tasks.builtin_models import BuiltinModelError, builtin_model_path, is_built, is_builtin_model_id
from tasks.command import build_argv, build_env, build_export_argv, build_export_env
from tasks.models import EventKind, ExportStatus, FinetuningTask, TaskExport, TaskStatus
from tasks.paths import folder_size, is_within
from tasks.publisher import ProgressPublisher, broadcast, publish_event
from tasks.selectors import run_folders
from tasks.services import (
    finetuning_task_after_finish,
    finetuning_task_finish,
    finetuning_task_purge,
    task_export_finish,
)
from tasks.storage import task_storage_sweep

_READ_CHUNK = 1 << 20
#: swift's line naming the versioned folder it created (``SftArguments._add_version``).
_OUTPUT_DIR_LINE = re.compile(r"\[INFO:swift\] output_dir: (?P<path>\S.*?)\s*$")

_TASK_STATUS = {RunStatus.SUCCEEDED: TaskStatus.COMPLETED, RunStatus.FAILED: TaskStatus.FAILED,
                RunStatus.STOPPED: TaskStatus.STOPPED}


def _holder(kind: str, run: Run, user: Any, status: str, choices: Any, *, url: str | None) -> dict[str, Any]:
    name = run.label.split(" ", 1)[-1] if kind == "task" else run.label  # a task's label is "#<id> <name>"
    return holder_view(kind, run, user, name=name, status=status,
                       status_label=str(dict(choices).get(status, status)), url=url)


# --- training ---------------------------------------------------------------------------------------
@register
class TrainingWorkload(Workload):
    kind = "train"
    noun = "task"

    def __init__(self, run: Run, supervisor: Any) -> None:
        super().__init__(run, supervisor)
        self.task = FinetuningTask.objects.get(pk=run.subject_id)
        self.publisher = ProgressPublisher(self.task, guard=self._owned)
        self.jsonl: JsonlTail | None = None
        self.run_dir: Path | None = None
        self.resume_from: Path | None = Path(self.task.resume_from) if self.task.resume_from else None
        self.folders_before: set[str] = set()

    def _owned(self) -> bool:
        """The publisher's fence (and heartbeat): this supervisor still owns the run."""
        return bool(self.supervisor.owned().update(heartbeat_at=Now()))

    # --- in the supervising process -----------------------------------------------------------
    def claimed(self) -> None:
        FinetuningTask.objects.filter(pk=self.task.pk, status=TaskStatus.QUEUED).update(status=TaskStatus.RUNNING)
        self.task.status = TaskStatus.RUNNING
        task, host = self.task, self.run.host
        if self.resume_from is not None:
            self.publisher.event(EventKind.STARTED, f"Started on {host}: run {task.run_number}, resuming from "
                                 f"{self.resume_from.name}", host=host, run=task.run_number,
                                 checkpoint=str(self.resume_from))
        else:
            self.publisher.event(EventKind.STARTED, f"Started on {host}", host=host)

    def prepare(self) -> Launch:
        task = self.task
        output_dir = Path(task.output_path)
        workdir = Path(task.log_file_path).parent
        if _builtin_model_missing(task.base_model):
            self.publisher.add_lines([f"[platform] Building the built-in model {task.base_model} on its first use "
                                      "(a few seconds)"])
            self.publisher.flush(force=True)
        workdir.mkdir(parents=True, exist_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(task, output_dir=output_dir, resume_from=self.resume_from)  # builds a built-in model
        launch = build_env(task, run=self.run, workdir=workdir)
        if self.resume_from is None:
            self.follow_run_dir(output_dir)
        else:
            # swift names the new folder at start-up; remember what existed so it can be told apart.
            self.folders_before = {p.name for p in run_folders(output_dir)}
        header = ([f"--- run {task.run_number}: resuming from {self.resume_from} ---"]
                  if self.resume_from is not None else [])
        return Launch(argv=argv, env=launch.env, workdir=workdir, header=header)

    def take_lines(self, lines: list[str]) -> None:
        self.publisher.add_lines(lines)
        for line in lines:
            if self.jsonl is None and self.resume_from is not None:
                named = _OUTPUT_DIR_LINE.search(line)
                if named:
                    self.find_run_dir(named.group("path"))
            path = checkpoint_saved(line)
            if path:
                self.publisher.set(last_checkpoint=path)
                self.publisher.event(EventKind.CHECKPOINT, f"Checkpoint saved: {Path(path).name}", path=path)

    def read_more(self) -> bool:
        if self.jsonl is None and self.resume_from is not None:
            self.find_run_dir()
        if self.jsonl is None:
            return True
        for record in self.jsonl.read(max_bytes=_READ_CHUNK):
            meaning = interpret_logging_record(record)
            if meaning.point is not None:
                self.publisher.add_metric(meaning.point)
            if meaning.summary is not None:
                self.publisher.add_summary(meaning.summary, meaning.nonfinite)
            if meaning.last_checkpoint:
                self.publisher.set(last_checkpoint=meaning.last_checkpoint)
            if self.publisher.full:
                return False
        return self.jsonl.caught_up

    @property
    def full(self) -> bool:
        return self.publisher.full

    def flush(self, *, force: bool = False) -> bool:
        done = self.publisher.flush(force=force)
        if self.publisher.fenced:
            self.supervisor.lose("its progress write matched no run of its own")
        return done

    def follow_run_dir(self, folder: Path) -> None:
        """Follow ``folder/logging.jsonl`` from now on (the folder this run writes into)."""
        self.run_dir = folder
        self.jsonl = JsonlTail(folder / "logging.jsonl")
        self.publisher.set(run_dir=str(folder))

    def find_run_dir(self, named: str | None = None) -> None:
        """The versioned folder of a resumed run: the one swift named in its log if it is a new folder
        directly under the output folder, else the newest ``v*-*`` folder not there before the launch."""
        output_dir = Path(self.task.output_path)
        if named is not None:
            candidate = Path(named)
            if candidate.parent == output_dir and is_within(candidate, output_dir) and (
                candidate.name not in self.folders_before
            ):
                self.follow_run_dir(candidate)
            return
        fresh = [p for p in run_folders(output_dir) if p.name not in self.folders_before]
        if fresh:
            self.follow_run_dir(fresh[-1])

    def conclude(self, exit_code: int | None, *, stopped: bool, shutdown: bool, failure: str,
                 tail: Sequence[str]) -> Outcome:
        if shutdown and exit_code != 0:
            return Outcome(RunStatus.FAILED, exit_code, (
                f"The worker on host {self.run.host} was shut down (Ctrl-C or SIGTERM) while this task ran; its "
                "swift process was stopped. Resume from the last checkpoint or start the task again."))
        if stopped and exit_code != 0:
            return Outcome(RunStatus.STOPPED, exit_code)
        if exit_code == 0:
            self.publisher.set(progress=100.0, eta_seconds=0.0)
            latest = _latest_checkpoint(self.run_dir or Path(self.task.output_path))
            if latest and _step_of(latest) >= _step_of(self.task.last_checkpoint):
                self.publisher.set(last_checkpoint=latest)
            return Outcome(RunStatus.SUCCEEDED, 0)
        return Outcome(RunStatus.FAILED, exit_code,
                       failure or explain_failure(list(tail), exit_code, offline=settings.FINETUNE_OFFLINE))

    def ended(self, outcome: Outcome) -> None:
        if not self.publisher.flush(force=True):  # the last progress goes with the ending, or neither
            raise DatabaseError("the last progress of the run could not be written")
        finetuning_task_finish(task=self.task, status=_TASK_STATUS[outcome.status], error=outcome.error,
                               exit_code=outcome.exit_code)

    def after(self, outcome: Outcome) -> None:
        finetuning_task_after_finish(task_id=self.task.pk)

    # --- without a supervisor -----------------------------------------------------------------
    @classmethod
    def booked(cls, run: Run, where: str) -> None:
        task = FinetuningTask.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if task is None:
            return
        FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.PENDING).update(status=TaskStatus.QUEUED)
        task.status = TaskStatus.QUEUED
        gpus = sorted(r.gpu.index for r in run.reservations.select_related("gpu") if r.gpu_id)
        publish_event(task, EventKind.QUEUED, f"Reserved {where}; handed to its worker", host=run.host, gpus=gpus)

    @classmethod
    def requeued(cls, run: Run, reason: str) -> None:
        task = FinetuningTask.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if task is not None and FinetuningTask.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
            status=TaskStatus.PENDING
        ):
            task.status = TaskStatus.PENDING
            publish_event(task, EventKind.REQUEUED, reason)

    @classmethod
    def waiting(cls, run: Run, reason: str) -> None:
        # The reason lives on the run (``task.wait_reason`` reads it); tell the task's page and lists.
        task = FinetuningTask.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if task is not None:
            broadcast(task, {"wait_reason": reason})

    @classmethod
    def failed_unsupervised(cls, run: Run, reason: str) -> None:
        task = FinetuningTask.objects.filter(pk=run.subject_id, run_id=run.pk).first()
        if task is not None and finetuning_task_finish(task=task, status=TaskStatus.FAILED, error=reason):
            task.refresh_from_db()
            if task.delete_requested_at is not None:
                finetuning_task_purge(task=task)

    @classmethod
    def swept(cls, host: str) -> None:
        task_storage_sweep(host=host)  # the disk the running tasks of this host use (issue 12)

    @classmethod
    def holders(cls, runs: Sequence[Run], user: Any) -> dict[int, dict[str, Any]]:
        rows = dict(FinetuningTask.objects.filter(pk__in=[r.subject_id for r in runs]).values_list("pk", "status"))
        return {run.pk: _holder("task", run, user, rows.get(run.subject_id, ""), TaskStatus.choices,
                                url=reverse("task_detail", args=[run.subject_id])) for run in runs}

    @classmethod
    def holder(cls, run: Run, user: Any) -> dict[str, Any]:
        return cls.holders([run], user)[run.pk]


def _builtin_model_missing(base_model: str) -> bool:
    if not is_builtin_model_id(base_model):
        return False
    try:
        return not is_built(builtin_model_path(base_model))
    except BuiltinModelError:
        return False  # build_argv says why it cannot run


def _step_of(path: str) -> int:
    suffix = Path(path).name.removeprefix("checkpoint-") if path else ""
    return int(suffix) if suffix.isdigit() else -1


def _latest_checkpoint(output_dir: Path) -> str:
    best: tuple[int, str] | None = None
    for child in output_dir.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if child.is_dir() and suffix.isdigit() and (best is None or int(suffix) > best[0]):
            best = (int(suffix), str(child))
    return best[1] if best else ""


# --- export -----------------------------------------------------------------------------------------
#: The stored log keeps the last lines (the whole file stays on disk next to it).
LOG_TAIL_LINES = 2000
LOG_TAIL_CHARS = 256 * 1024
_SAVE_EVERY = 1.0


def remove_partial_output(export: TaskExport) -> None:
    """Remove a merged folder that is not the result of a completed export (a failed or interrupted
    merge, or a leftover), only ever inside the task's own output folder."""
    target = Path(export.output_path)
    output = Path(export.task.output_path)
    if not export.output_path or not target.name.endswith("-merged") or not is_within(target, output):
        return
    owned = TaskExport.objects.filter(output_path=export.output_path, status=ExportStatus.COMPLETED).exclude(
        pk=export.pk
    )
    if owned.exists() or not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
    else:
        shutil.rmtree(target, ignore_errors=True)


@register
class ExportWorkload(Workload):
    kind = "export"
    noun = "export"
    supervisor_gone = "The worker running this export stopped (worker crash or restart); export the checkpoint again."

    def __init__(self, run: Run, supervisor: Any) -> None:
        super().__init__(run, supervisor)
        self.export = TaskExport.objects.select_related("task").get(pk=run.subject_id)
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.received = 0
        self.saved = -1
        self.last_save = 0.0
        self.db = Backoff()  # a database outage delays the stored log, never the merge

    def claimed(self) -> None:
        TaskExport.objects.filter(pk=self.export.pk, status=ExportStatus.PENDING).update(status=ExportStatus.RUNNING)
        self.export.status = ExportStatus.RUNNING
        broadcast(self.export.task, {"export": self.export.pk})

    def prepare(self) -> Launch:
        export = self.export
        checkpoint, target = Path(export.checkpoint), Path(export.output_path)
        output = Path(export.task.output_path)
        workdir = Path(export.log_file_path).parent
        if not is_within(checkpoint, output) or not is_within(target, output):
            raise LaunchError("The checkpoint and the merged folder must be inside the task's output folder.")
        workdir.mkdir(parents=True, exist_ok=True)
        remove_partial_output(export)  # a leftover of an earlier, interrupted merge
        if target.exists():
            raise LaunchError(f"{target} exists already and belongs to a completed export.")
        argv = build_export_argv(checkpoint=checkpoint, output_dir=target)
        return Launch(argv=argv, env=build_export_env(workdir=workdir).env, workdir=workdir)

    def take_lines(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        self.received += len(lines)

    def log_text(self) -> str:
        return "\n".join(self.lines)[-LOG_TAIL_CHARS:]

    def flush(self, *, force: bool = False) -> bool:
        if self.received == self.saved:
            return True
        now = time.monotonic()
        if not self.db.ready() or (not force and now - self.last_save < _SAVE_EVERY):
            return False
        self.last_save = now
        try:
            with transaction.atomic():
                TaskExport.objects.filter(pk=self.export.pk, run_id=self.run.pk).update(log_text=self.log_text())
                broadcast(self.export.task, {"export": self.export.pk})  # the task page shows the log's tail
        except DatabaseError as exc:  # a database hiccup must not kill the merge; saved at the next try
            database_failed(exc, what=f"Saving the log of export {self.export.pk}", backoff=self.db)
            return False
        self.db.succeeded()
        self.saved = self.received
        return True

    def conclude(self, exit_code: int | None, *, stopped: bool, shutdown: bool, failure: str,
                 tail: Sequence[str]) -> Outcome:
        target = Path(self.export.output_path)
        if exit_code == 0 and not stopped and not shutdown and (target / "config.json").is_file():
            return Outcome(RunStatus.SUCCEEDED, 0)
        if shutdown:
            error = (f"The worker on host {self.run.host} was shut down (Ctrl-C or SIGTERM) during the export; the "
                     "partial merged folder was removed. Export again.")
        elif stopped:
            error = "Stopped on request; the partial merged folder was removed."
        elif exit_code == 0:
            error = f"swift export exited without writing {target.name}/config.json."
        else:
            error = explain_failure(list(self.lines), exit_code, offline=settings.FINETUNE_OFFLINE, what="export")
        remove_partial_output(self.export)
        return Outcome(RunStatus.FAILED, exit_code, error)

    def ended(self, outcome: Outcome) -> None:
        if self.received != self.saved:
            TaskExport.objects.filter(pk=self.export.pk).update(log_text=self.log_text())
            self.saved = self.received
        completed = outcome.status == RunStatus.SUCCEEDED
        task_export_finish(
            export=self.export, status=ExportStatus.COMPLETED if completed else ExportStatus.FAILED,
            error=outcome.error, size_bytes=folder_size(Path(self.export.output_path)) if completed else None,
        )

    @classmethod
    def failed_unsupervised(cls, run: Run, reason: str) -> None:
        export = TaskExport.objects.filter(pk=run.subject_id, run_id=run.pk).select_related("task").first()
        if export is None:
            return
        if run.host == settings.FINETUNE_HOST:
            remove_partial_output(export)
        task_export_finish(export=export, status=ExportStatus.FAILED, error=reason)

    @classmethod
    def holders(cls, runs: Sequence[Run], user: Any) -> dict[int, dict[str, Any]]:
        rows = {pk: (status, task_id) for pk, status, task_id in TaskExport.objects.filter(
            pk__in=[r.subject_id for r in runs]).values_list("pk", "status", "task_id")}
        out = {}
        for run in runs:
            status, task_id = rows.get(run.subject_id, ("", None))
            url = reverse("task_detail", args=[task_id]) if task_id else None
            out[run.pk] = _holder("export", run, user, status, ExportStatus.choices, url=url)
        return out

    @classmethod
    def holder(cls, run: Run, user: Any) -> dict[str, Any]:
        return cls.holders([run], user)[run.pk]

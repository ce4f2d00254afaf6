"""Everything that reads tasks and datasets for a user. Ownership comes from ``for_user``."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.db import connection
from django.db.models import F, QuerySet, Sum, Window
from django.db.models.functions import Length, RowNumber
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from gpus.models import Host
from gpus.placement import UNKNOWN, GpuSlot, Request, TimedHost, earliest_start, occupy
from gpus.scheduler import serving_order
from tasks.models import (
    Dataset,
    FinetuningTask,
    TaskEvent,
    TaskExport,
    TaskLogLine,
    TaskMetric,
    TaskStatus,
)
from tasks.paths import folder_size, is_within


def finetuning_task_list(*, user: Any) -> QuerySet[FinetuningTask]:
    return FinetuningTask.objects.for_user(user).visible().select_related("owner", "run").prefetch_related(
        "run__reservations__gpu"
    )


def finetuning_task_get(*, user: Any, pk: Any) -> FinetuningTask:
    """The user's task or 404 (another user's task does not exist for them)."""
    return get_object_or_404(finetuning_task_list(user=user), pk=pk)


def task_log_lines(*, task: FinetuningTask, after: int = 0, limit: int = 1000) -> list[TaskLogLine]:
    return list(TaskLogLine.objects.filter(task=task, seq__gt=after).order_by("seq")[:limit])


def task_log_page(
    *, task: FinetuningTask | int, after: int = 0, limit: int = 1000, max_chars: int = 1024 * 1024
) -> tuple[list[TaskLogLine], bool]:
    """At most ``limit`` log lines after ``after`` holding at most ``max_chars`` characters of text (at
    least one line), read in batches; and whether lines after them were left out."""
    lines: list[TaskLogLine] = []
    chars = 0
    rows = TaskLogLine.objects.filter(task=task, seq__gt=after).order_by("seq")[: limit + 1]
    for line in rows.iterator(chunk_size=500):
        if len(lines) == limit or (lines and chars + len(line.text) > max_chars):
            return lines, True
        lines.append(line)
        chars += len(line.text)
    return lines, False


def task_metric_points(*, task: FinetuningTask, after_step: int = 0) -> QuerySet[TaskMetric]:
    return TaskMetric.objects.filter(task=task, step__gt=after_step).order_by("step", "kind")


#: The task page draws at most this many points of each kind (training, evaluation) when it opens.
CHART_SAMPLE = 500


def task_metric_cursor(*, task: FinetuningTask | int) -> int:
    """The id of the task's newest metric point (0 without any): a page that drew its chart from a
    sample taken after reading it asks its socket only for the points after it."""
    newest = TaskMetric.objects.filter(task=task).order_by("-pk").values_list("pk", flat=True).first()
    return newest or 0


def task_metric_sample(*, task: FinetuningTask | int, per_kind: int = CHART_SAMPLE) -> list[TaskMetric]:
    """The task's chart, bounded: for each kind, the first point at or after each of ``per_kind + 1``
    evenly spaced steps from its first step to its last (so the first and the last point are in,
    and every point of a task with fewer). One query of at most ``2 × (per_kind + 1)`` index probes,
    whether the task has 20 points or 100,000; by step."""
    table = TaskMetric._meta.db_table
    # Portable SQL (PostgreSQL and SQLite): each probe is a scalar subquery reading one entry of the
    # (task, kind, step) unique index. PostgreSQL would inline the CTEs and evaluate the bounds again
    # for every probe: they are computed once.
    once = "MATERIALIZED" if connection.vendor == "postgresql" else ""
    sql = f"""
        WITH RECURSIVE probe (i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM probe WHERE i < %(n)s),
        kinds (kind) AS (SELECT 'train' UNION ALL SELECT 'eval'),
        bounds AS {once} (
            SELECT kinds.kind,
                   (SELECT min(step) FROM {table} WHERE task_id = %(task)s AND kind = kinds.kind) AS lo,
                   (SELECT max(step) FROM {table} WHERE task_id = %(task)s AND kind = kinds.kind) AS hi
            FROM kinds
        ),
        picked AS {once} (
            SELECT (SELECT m.id FROM {table} AS m
                    WHERE m.task_id = %(task)s AND m.kind = bounds.kind
                      AND m.step >= bounds.lo + (bounds.hi - bounds.lo) * probe.i / %(n)s
                    ORDER BY m.step LIMIT 1) AS id
            FROM bounds CROSS JOIN probe WHERE bounds.lo IS NOT NULL
        )
        SELECT id, task_id, kind, step, loss, learning_rate FROM {table}
        WHERE id IN (SELECT id FROM picked) ORDER BY step, kind
    """  # the table name is the model's; the values are parameters. Other columns are deferred.
    task_id = task.pk if isinstance(task, FinetuningTask) else int(task)
    return list(TaskMetric.objects.raw(sql, {"task": task_id, "n": max(1, per_kind)}))


def task_log_tail(*, task: FinetuningTask, lines: int = 40) -> list[TaskLogLine]:
    """The last ``lines`` lines of the task's log (sequence numbers are contiguous from 1)."""
    return task_log_lines(task=task, after=max(0, task.last_log_seq - lines), limit=lines)


def task_events(*, task: FinetuningTask, after_id: int = 0) -> QuerySet[TaskEvent]:
    return TaskEvent.objects.filter(task=task, pk__gt=after_id).order_by("created_at", "id")


def task_events_latest(*, task: FinetuningTask, limit: int) -> tuple[list[TaskEvent], int]:
    """The task's last ``limit`` events, oldest first, and how many it has in all."""
    events = list(TaskEvent.objects.filter(task=task).order_by("-created_at", "-id")[:limit])[::-1]
    total = len(events) if len(events) < limit else TaskEvent.objects.filter(task=task).count()
    return events, total


def dataset_list(*, user: Any) -> QuerySet[Dataset]:
    return Dataset.objects.for_user(user).select_related("owner")


def dataset_get(*, user: Any, pk: Any) -> Dataset:
    return get_object_or_404(dataset_list(user=user), pk=pk)


@dataclass(frozen=True)
class DatasetRef:
    """One entry of ``task.datasets`` as a page shows it."""

    spec: str  #: as stored: an uploaded dataset's id, ``builtin:<name>`` or a hub id
    dataset: Dataset | None = None  #: the uploaded dataset, when it still exists
    uploaded: bool = False  #: an id of an uploaded dataset (deleted since when ``dataset`` is None)


def task_dataset_refs(*, user: Any, task: FinetuningTask) -> list[DatasetRef]:
    """The task's datasets with uploaded ids resolved to the datasets (of the task's owner, and only
    those the user may see); builtin and hub ids stay as they are."""
    ids = [int(spec) for spec in task.datasets if _is_dataset_id(spec)]
    found = {d.pk: d for d in Dataset.objects.for_user(user).filter(owner_id=task.owner_id, pk__in=ids)} if ids else {}
    refs: list[DatasetRef] = []
    for spec in task.datasets:
        if _is_dataset_id(spec):
            refs.append(DatasetRef(spec=str(int(spec)), dataset=found.get(int(spec)), uploaded=True))
        else:
            refs.append(DatasetRef(spec=str(spec)))
    return refs


def _is_dataset_id(spec: Any) -> bool:
    return (isinstance(spec, int) and not isinstance(spec, bool)) or (
        isinstance(spec, str) and re.fullmatch(r"[0-9]+", spec) is not None
    )


def dataset_find(*, user: Any, ref: str) -> Dataset | None:
    """A dataset of the user's by id or by exact name (the seed API's ``datasetPath``)."""
    qs = Dataset.objects.filter(owner=user)
    if "\x00" in ref:
        return None  # no name holds one (and PostgreSQL refuses it in a query)
    if re.fullmatch(r"[0-9]{1,18}", ref):  # ASCII digits only: "²".isdigit() is true, int("²") fails
        return qs.filter(pk=int(ref)).first()
    return qs.filter(name=ref).order_by("-created_at").first()


# --- the live pages and their WebSockets (issue #4) ----------------------------------------------
def finetuning_task_find(*, user: Any, pk: Any) -> FinetuningTask | None:
    """The user's task or ``None`` (consumers close with 4404 instead of raising Http404)."""
    try:
        key = int(pk)
    except (TypeError, ValueError):
        return None
    return finetuning_task_list(user=user).filter(pk=key).first()


def finetuning_task_rows(*, user: Any, ids: list[int]) -> list[FinetuningTask]:
    """The user's visible tasks among ``ids`` (what a list page shows); others are left out."""
    return list(finetuning_task_list(user=user).filter(pk__in=ids))


def finetuning_task_status_counts(*, user: Any) -> dict[str, int]:
    """How many of the user's visible tasks are in each status."""
    from django.db.models import Count

    rows = finetuning_task_list(user=user).order_by().values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def task_metrics_after(*, task: FinetuningTask | int, after_id: int = 0, limit: int = 5000) -> list[TaskMetric]:
    """Metric points stored after the point with id ``after_id`` (a cursor that survives upserts)."""
    return list(TaskMetric.objects.filter(task=task, pk__gt=after_id).order_by("pk")[:limit])


#: Events a live page is sent when it connects (the newest; older ones are in the events API).
LIVE_EVENTS_ON_CONNECT = 500


def task_events_after(*, task: FinetuningTask | int, after_id: int = 0) -> list[TaskEvent]:
    """Lifecycle events recorded after the event with id ``after_id``, oldest first. From the start
    (``after_id`` 0) only the newest :data:`LIVE_EVENTS_ON_CONNECT`: a page keeps no more."""
    events = TaskEvent.objects.filter(task=task, pk__gt=after_id)
    if after_id <= 0:
        return list(reversed(events.order_by("-pk")[:LIVE_EVENTS_ON_CONNECT]))
    return list(events.order_by("pk"))


def task_checkpoints(*, task: FinetuningTask) -> list[str]:
    """The checkpoint folders of every run of the task, by step (oldest save last among equal
    steps), as seen from this host. See :func:`task_checkpoint_list` for details."""
    return [c.path for c in task_checkpoint_list(task=task)]


# --- the queue ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueEntry:
    """A waiting task as the queue shows it. Another user's task is shown without its name or id."""

    position: int
    task: FinetuningTask
    visible: bool
    request: Request
    estimated_start: datetime | None
    note: str


def _timed_inventory() -> list[TimedHost]:
    """Live, enabled hosts with, for each GPU and CPU slot, the seconds until it is free: 0 when
    free, the holder's ETA when a running task with an ETA holds it, unknown otherwise."""
    hosts: list[TimedHost] = []
    live = list(Host.objects.live().filter(enabled=True).prefetch_related("gpus", "reservations"))
    run_ids = {r.run_id for host in live for r in host.reservations.all()}
    etas = dict(FinetuningTask.objects.filter(run_id__in=run_ids, status=TaskStatus.RUNNING, eta_seconds__isnull=False)
                .values_list("run_id", "eta_seconds"))
    for host in live:
        timed = TimedHost(name=host.name)
        for g in host.gpus.all():
            if g.enabled and g.present:
                timed.gpus.append(GpuSlot(id=g.pk, host=host.name, index=g.index, uuid=g.uuid,
                                          memory_total_mb=g.memory_total_mb))
                timed.gpu_free_in[g.pk] = 0.0
        timed.slot_free_in = dict.fromkeys(range(host.cpu_slots), 0.0)
        for r in host.reservations.all():
            free_in = max(0.0, etas[r.run_id]) if r.run_id in etas else UNKNOWN
            if r.gpu_id in timed.gpu_free_in:
                timed.gpu_free_in[r.gpu_id] = free_in
            elif r.cpu_slot is not None:
                timed.slot_free_in[r.cpu_slot] = free_in
        hosts.append(timed)
    return hosts


def _waiting() -> QuerySet[FinetuningTask]:
    return FinetuningTask.objects.filter(
        status=TaskStatus.PENDING, run__stop_requested_at__isnull=True, delete_requested_at__isnull=True
    )


def _serving_order(hosts: list[TimedHost], limit: int | None) -> list[FinetuningTask]:
    """The first ``limit`` waiting tasks in the dispatcher's order (``gpus.scheduler.serving_order``:
    priority, then users take turns). No user can have more than ``limit`` tasks among the first
    ``limit``, so only each user's first ``limit`` tasks are read (one query), not the whole queue."""
    waiting = _waiting().select_related("owner", "run")
    if limit is not None:
        waiting = waiting.annotate(
            owner_rank=Window(RowNumber(), partition_by=[F("owner_id")],
                              order_by=[F("priority").desc(), F("created_at").asc(), F("id").asc()]),
        ).filter(owner_rank__lte=limit)
    tasks = list(waiting.queue_order())
    by_run = {task.run_id: task for task in tasks if task.run is not None}
    ordered = [by_run[run.pk] for run in serving_order([task.run for task in tasks if task.run is not None],
                                                       hosts=hosts)]
    ordered += [task for task in tasks if task.run is None]
    return ordered[:limit] if limit is not None else ordered


def queue_entries(*, user: Any, limit: int | None = None) -> list[QueueEntry]:
    """Every waiting (``pending``) task in the order the dispatcher considers them (the first
    ``limit``), with an estimated start from the running tasks' ETAs (``None`` when it depends on
    work without one).

    The estimate walks the queue in order: each task takes the resources that free up first
    among those it can use, and keeps them (its own run time is unknown). Held tasks keep their
    position but take nothing.
    """
    now = timezone.now()
    hosts = _timed_inventory()
    entries: list[QueueEntry] = []
    for position, task in enumerate(_serving_order(hosts, limit), start=1):
        request = Request.from_task(task.gpu_config or {}, task.memory_estimate_gb)
        visible = bool(getattr(user, "is_staff", False) or task.owner_id == getattr(user, "pk", None))
        start: datetime | None = None
        if task.held:
            note = _("on hold")
        elif task.wait_reason:  # a quota: it starts when the quota allows, not when GPUs free up
            note = task.wait_reason if visible else _("waits for its owner's quota")
        elif not hosts:
            note = _("no worker host is online")
        else:
            found = earliest_start(request, hosts)
            if found is None:
                note = _("does not fit on any online host")
            elif found[0] == UNKNOWN:
                note = _("waits for work without an estimated end")
            else:
                start = now + timedelta(seconds=found[0])
                note = _("next") if found[0] == 0 else _("after running tasks end")
            if found is not None:
                occupy(found[1], hosts)
        entries.append(QueueEntry(position=position, task=task, visible=visible, request=request,
                                  estimated_start=start, note=note))
    return entries


class QueuePages:
    """The queue as a sequence a paginator counts and slices: a slice computes the entries up to its
    end only (an entry's estimate depends on those in front of it), not the whole queue."""

    def __init__(self, *, user: Any) -> None:
        self.user = user

    def count(self) -> int:
        return _waiting().count()

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, key: slice) -> list[QueueEntry]:
        return queue_entries(user=self.user, limit=key.stop)[key]


# --- checkpoints and exports (issue 5) -------------------------------------------------------------
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_RUN_FOLDER = re.compile(r"v\d+-\d{8}-\d{6}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder of one of the task's runs."""

    path: str  #: absolute
    name: str  #: checkpoint-N
    step: int
    run: str  #: "" for the first run (the output folder), else the resumed run's folder (v0-…)
    saved_at: datetime

    @property
    def size_bytes(self) -> int:
        """The folder's size, measured when asked for (see :func:`checkpoint_size`)."""
        return checkpoint_size(self.path)


def checkpoint_size(path: str) -> int:
    """A checkpoint folder's size in bytes. A complete checkpoint does not change (the trainer writes
    its ``trainer_state.json`` last), so its size is remembered, per process, by that file's time:
    pages and API reads do not walk the same folders again. One still being written is walked."""
    try:
        written = (Path(path) / "trainer_state.json").stat().st_mtime_ns
    except OSError:
        return folder_size(Path(path))
    return _complete_checkpoint_size(path, written)


@functools.lru_cache(maxsize=4096)
def _complete_checkpoint_size(path: str, written: int) -> int:
    return folder_size(Path(path))


def run_folders(output: Path) -> list[Path]:
    """The folders swift created under the output folder for resumed runs (``v<N>-<date>-<time>``),
    in creation order (by N)."""
    try:
        found = [p for p in output.iterdir() if _RUN_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(p.name[1:].split("-")[0]))


def task_checkpoint_list(*, task: FinetuningTask) -> list[Checkpoint]:
    """Every checkpoint of every run of the task, ordered by step, then by the time it was saved.

    The first run writes into the output folder; each resumed run writes into a versioned folder
    swift creates under it (``output/v0-…/checkpoint-N``). Symlinks (``last-checkpoint``), merged
    exports (``checkpoint-N-merged``) and anything that resolves outside the output folder are left out.
    """
    if not task.output_path:
        return []
    output = Path(task.output_path)
    found: list[Checkpoint] = []
    for folder in [output, *run_folders(output)]:
        try:
            children = list(folder.iterdir())
        except OSError:
            continue
        for child in children:
            match = _CHECKPOINT_NAME.fullmatch(child.name)
            if not match or child.is_symlink() or not child.is_dir() or not is_within(child, output):
                continue
            state = child / "trainer_state.json"
            try:
                mtime = (state if state.is_file() else child).stat().st_mtime
            except OSError:
                continue
            found.append(Checkpoint(
                path=str(child.resolve()), name=child.name, step=int(match.group(1)),
                run="" if folder == output else folder.name,
                saved_at=datetime.fromtimestamp(mtime, tz=UTC),
            ))
    return sorted(found, key=lambda c: (c.step, c.saved_at, c.path))


def task_checkpoint_default(*, task: FinetuningTask, checkpoints: list[Checkpoint] | None = None) -> Checkpoint | None:
    """The checkpoint used when none is named: the task's last checkpoint (the newest save of the
    current line of runs) if it is still on disk, else the one with the highest step."""
    checkpoints = task_checkpoint_list(task=task) if checkpoints is None else checkpoints
    if not checkpoints:
        return None
    if task.last_checkpoint:
        try:
            last = str(Path(task.last_checkpoint).resolve())
        except (OSError, RuntimeError):
            last = ""
        for checkpoint in checkpoints:
            if checkpoint.path == last:
                return checkpoint
    return checkpoints[-1]


#: What the task page's cards (error, details, checkpoints, exports, command line) are rendered from.
_CARD_FIELDS = (
    "status", "last_checkpoint", "run__command", "run__host", "run_number", "resume_from", "run__error",
    "run__stop_requested_at", "output_path", "run__wait_reason",
)


def task_cards_revision(*, task: FinetuningTask | int) -> str:
    """A short fingerprint of what the task page's cards show: it changes when one of them would
    render differently (a status, a checkpoint, the command, an export's progress). The page's socket
    sends it and the page fetches the re-rendered cards when it differs from the one it shows.
    Checkpoint folders are not scanned: a save moves ``last_checkpoint``."""
    if isinstance(task, FinetuningTask):
        run = task.run
        row: dict[str, Any] | None = {
            name: getattr(run, name.removeprefix("run__"), None) if name.startswith("run__") else getattr(task, name)
            for name in _CARD_FIELDS
        }
        task_id = task.pk
    else:
        task_id = task
        row = FinetuningTask.objects.filter(pk=task_id).values(*_CARD_FIELDS).first()
    if row is None:
        return ""
    exports = list(
        TaskExport.objects.filter(task_id=task_id).order_by("pk").annotate(log_chars=Length("log_text"))
        .values_list("pk", "status", "log_chars", "run__status")
    )
    blob = json.dumps([row, exports], default=str, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def task_export_list(*, task: FinetuningTask) -> QuerySet[TaskExport]:
    return TaskExport.objects.filter(task=task).order_by("-created_at", "-id")


def task_export_get(*, user: Any, pk: Any) -> TaskExport:
    """The user's export (of a task they can see) or 404."""
    visible = finetuning_task_list(user=user)
    return get_object_or_404(TaskExport.objects.for_user(user).filter(task__in=visible).select_related("task"), pk=pk)


# --- the queue page ------------------------------------------------------------------------------
def request_label(kind: str, count: int, devices: list[str], min_memory_gb: float) -> str:
    """What a waiting task asked for, in words: ``2 × GPU, ≥ 40 GiB each``, ``GPU 0,1``, ``CPU slot``."""
    if kind == "cpu":
        return _("a CPU slot")
    if kind == "auto":
        text = _("one GPU, or a CPU slot on a host without GPUs")
    elif devices:
        text = _("GPU %(devices)s") % {"devices": ",".join(devices)}
    else:
        text = _("%(n)s × GPU") % {"n": count}
    if min_memory_gb:
        text += " · " + _("≥ %(gb)s GiB each") % {"gb": f"{min_memory_gb:g}"}
    return text


def _to_minute(moment: datetime | None) -> datetime | None:
    """An estimate to the minute: the page says "in ~12 min", and a start time that moves by
    seconds on every read must not count as a change."""
    if moment is None:
        return None
    return (moment + timedelta(seconds=30)).replace(second=0, microsecond=0)


def queue_overview(*, user: Any) -> list[dict[str, Any]]:
    """The waiting tasks in dispatch order (``queue_entries``), as the queue page shows them."""
    now = timezone.now()
    entries = []
    for entry in queue_entries(user=user):
        task, r = entry.task, entry.request
        count = r.count if r.kind == "gpu" else (0 if r.kind == "cpu" else 1)
        min_memory_gb = round(r.min_memory_mb / 1024, 1)
        start = _to_minute(entry.estimated_start)
        entries.append({
            "position": entry.position,
            "visible": entry.visible,
            "id": task.pk if entry.visible else None,
            "name": task.name if entry.visible else _("another user's task"),
            "owner": task.owner.get_username() if entry.visible else None,
            "mine": task.owner_id == user.pk,
            "url": reverse("task_detail", args=[task.pk]) if entry.visible else None,
            "priority": task.priority,
            "held": task.held,
            "created_at": task.created_at,
            "waited_seconds": max(0, round((now - task.created_at).total_seconds())),
            "request": {"kind": r.kind, "count": count, "devices": list(r.devices), "min_memory_gb": min_memory_gb},
            "request_label": request_label(r.kind, count, list(r.devices), min_memory_gb),
            "estimated_start": start,
            "starts_in_seconds": max(0, round((start - now).total_seconds())) if start else None,
            "note": str(entry.note),
        })
    return entries


def starts_in_text(seconds: float | None) -> str:
    """``None`` → empty (the page shows the note instead); ``90`` → ``in ~2 min``; ``5400`` →
    ``in ~1 h 30 min``. Mirrored by ``static/js/queue.js``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return _("within a minute")
    minutes = int(seconds / 60 + 0.5)
    if minutes < 60:
        return _("in ~%(m)s min") % {"m": minutes}
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return _("in ~%(h)s h %(m)s min") % {"h": hours, "m": minutes}
    return _("in ~%(d)s d %(h)s h") % {"d": hours // 24, "h": hours % 24}


# --- storage (issue 12; docs/operations.md "Storage") -----------------------------------------------
def storage_by_owner(*, owner_ids: Iterable[int] | None = None) -> dict[int, int]:
    """Bytes each owner uses on the shared disk: the measured folders of their tasks (checkpoints,
    merged exports, logs: ``FinetuningTask.output_bytes``, including tasks whose delete waits for
    their process) plus their uploaded datasets. Every owner in ``owner_ids`` is in the answer (0 when
    they use nothing); without ``owner_ids``, every owner that uses something. Two queries."""
    tasks = FinetuningTask.objects.order_by()
    datasets = Dataset.objects.order_by()
    totals: dict[int, int] = {}
    if owner_ids is not None:
        ids = [int(pk) for pk in owner_ids]
        tasks, datasets = tasks.filter(owner_id__in=ids), datasets.filter(owner_id__in=ids)
        totals = dict.fromkeys(ids, 0)
    for rows in (tasks.values("owner_id").annotate(total=Sum("output_bytes")),
                 datasets.values("owner_id").annotate(total=Sum("size_bytes"))):
        for row in rows:
            totals[row["owner_id"]] = totals.get(row["owner_id"], 0) + int(row["total"] or 0)
    return totals


def largest_outputs(*, limit: int = 50) -> list[FinetuningTask]:
    """The tasks whose folders use the most disk, largest first, with their owner (for staff: who to
    ask to delete outputs). Tasks using nothing measured are left out."""
    return list(FinetuningTask.objects.filter(output_bytes__gt=0).select_related("owner")
                .order_by("-output_bytes", "-pk")[:limit])

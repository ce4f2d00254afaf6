"""What a kind of run adds to the one supervisor: the workload protocol and its registry.

The compute layer knows runs, not tasks or deployments. Each app above it registers, in its
``AppConfig.ready()``, one :class:`Workload` subclass per kind of run it asks for; the scheduler, the
supervisor, the reconciler and the GPU page reach the app only through it. A workload adds what is
its own (argv and environment, what swift's output means, readiness, what "done" means, what the
user sees change); the supervisor does everything else (claim, launch, follow, stop, conclude,
heartbeat, fencing, reconcile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from gpus.models import Run
    from gpus.supervisor import Supervisor


class Fenced(Exception):
    """A supervisor no longer owns its run: it writes nothing more and stops its process."""


@dataclass
class Launch:
    """How to start a run's process. ``shown`` is the argv as recorded and logged (a secret
    replaced); ``header`` lines are written to the log file before the command line."""

    argv: list[str]
    env: dict[str, str]
    workdir: Path
    shown: list[str] | None = None
    header: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: a :class:`gpus.models.RunStatus` value, an exit code and, for a failure, why
    in plain words (the first line is what lists show)."""

    status: str
    exit_code: int | None = None
    error: str = ""


class Workload:
    """One kind of run. An instance lives in the supervising process for one run; the class methods
    are called by the scheduler and the reconciler, which have no supervisor."""

    kind: ClassVar[str]
    #: What the holder of a GPU is called for a user who may not see it ("another user's task").
    noun: ClassVar[str] = "run"
    #: Why the reconciler failed a run of this host whose supervisor is gone (worker crash or restart).
    supervisor_gone: ClassVar[str] = ("The worker supervising this stopped (worker crash or restart); its swift "
                                      "process was stopped. Resume from the last checkpoint or start it again.")

    def __init__(self, run: Run, supervisor: Supervisor) -> None:
        self.run = run
        self.supervisor = supervisor

    # --- in the supervising process -----------------------------------------------------------
    def claimed(self) -> None:
        """In the claim's transaction: the subject shows that it runs."""

    def prepare(self) -> Launch:
        """Build argv, environment and working folder; raise :class:`core.swift_cli.env.LaunchError`
        with a message for the user when it cannot run as configured."""
        raise NotImplementedError

    def launched(self, launch: Launch) -> None:
        """The process started (its pid is recorded on the run)."""

    def take_lines(self, lines: list[str]) -> None:
        """New complete lines of the process's output, in order."""

    def read_more(self) -> bool:
        """Read other outputs of the process (a metrics file); True when all of it was read."""
        return True

    @property
    def full(self) -> bool:
        """The workload's buffer is full (the database is away): read no more output for now."""
        return False

    def flush(self, *, force: bool = False) -> bool:
        """Write what is buffered; True when nothing is left. Never raises for a database error."""
        return True

    def tick(self) -> str | None:
        """Called every loop turn while the process runs: a reason (for the user) ends the run
        ``failed`` now (a readiness timeout), ``None`` goes on."""
        return None

    def stop_note(self, reason: str) -> None:
        """A stop is being carried out (the owner asked, the worker shuts down, :meth:`tick`)."""

    def conclude(self, exit_code: int | None, *, stopped: bool, shutdown: bool, failure: str,
                 tail: Sequence[str]) -> Outcome:
        """What the exit means. ``stopped``: a stop was asked for; ``shutdown``: the worker is shutting
        down; ``failure``: the reason :meth:`tick` gave; ``tail``: the last lines of output."""
        raise NotImplementedError

    def ended(self, outcome: Outcome) -> None:
        """In the transaction that ends the run (only if this supervisor still owned it): the subject
        takes its final state."""

    def after(self, outcome: Outcome) -> None:
        """After that transaction committed (follow-up work: an automatic export, a purge)."""

    # --- without a supervisor -----------------------------------------------------------------
    @classmethod
    def booked(cls, run: Run, where: str) -> None:
        """In the scheduler's booking transaction: the run got resources (``where``: "GPU 0,1 on h1")."""

    @classmethod
    def requeued(cls, run: Run, reason: str) -> None:
        """The run went back to waiting (its host went silent before starting it, or the worker was
        shutting down)."""

    @classmethod
    def waiting(cls, run: Run, reason: str) -> None:
        """In the dispatch's transaction: why the waiting run is passed over changed (``reason``: a
        quota, in words for its owner, already written to ``run.wait_reason``; "" once it no longer
        applies). The subject's page shows it."""

    @classmethod
    def failed_unsupervised(cls, run: Run, reason: str) -> None:
        """The run was failed, or found lost, by the reconciler (no supervisor is left to say so)."""

    @classmethod
    def swept(cls, host: str) -> None:
        """Periodic upkeep of this kind's subjects on ``host`` (every host's minutely sweep calls it):
        cheap, bounded work such as measuring the disk that running tasks use."""

    @classmethod
    def holders(cls, runs: Sequence[Run], user: Any) -> dict[int, dict[str, Any]]:
        """:meth:`holder` of many runs at once (a page lists every GPU: one query per kind, not per
        GPU). Subclasses read their subjects in one query; the default asks :meth:`holder` per run."""
        return {run.pk: cls.holder(run, user) for run in runs}

    @classmethod
    def holder(cls, run: Run, user: Any) -> dict[str, Any]:
        """What the GPU page says about the run holding a GPU: ``{"kind", "id", "name", "status",
        "url"}`` for its owner and staff; for anyone else ``id``, ``name`` and ``url`` are ``None``."""
        return holder_view(cls.noun, run, user, name=run.label, status=run.status,
                           status_label=str(run.get_status_display()), url=None)


def holder_view(kind: str, run: Run, user: Any, *, name: str, status: str, status_label: str,
                url: str | None) -> dict[str, Any]:
    """A holder as :meth:`Workload.holder` describes it: id, name and link only for the run's owner and
    staff (``None`` for anyone else, whom the GPU page tells "another user's …")."""
    visible = bool(user.is_staff or run.owner_id == user.pk)
    return {"kind": kind, "id": run.subject_id if visible else None, "name": name if visible else None,
            "status": status, "status_label": status_label, "url": url if visible else None}


_REGISTRY: dict[str, type[Workload]] = {}


def register(workload: type[Workload]) -> type[Workload]:
    """Register a workload class for its ``kind`` (from an ``AppConfig.ready()``); usable as a decorator."""
    _REGISTRY[workload.kind] = workload
    return workload


def registered_workloads() -> list[type[Workload]]:
    """Every registered workload class, in registration order."""
    return list(_REGISTRY.values())


def workload_for(kind: str) -> type[Workload]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise LookupError(f"no workload is registered for runs of kind {kind!r}") from None

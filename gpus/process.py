"""Process-group helpers shared by training, export and deployment runners.

``swift`` is a wrapper that starts the real trainer (or torchrun, or uvicorn) as a child; a signal
to the wrapper alone orphans the child, which keeps the GPU or the port. Every launch therefore
starts a new session (its own process group) and every stop signals the whole group.

With ``FINETUNE_RUN_AS`` set, every launch runs as that OS user (:func:`run_as_popen_kwargs`), so the
code a hub model ships with cannot read the worker's secret key, database or other users' files.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import pwd
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from core.swift_cli.env import LaunchError

#: Seconds a supervised group gets between SIGTERM and SIGKILL when the worker shuts down (swift
#: exits within a fraction of a second on SIGTERM; nothing is saved either way).
SHUTDOWN_GRACE_SECONDS = 5.0


def process_matches(pid: int | None, create_time: float | None) -> bool:
    """True if ``pid`` is alive and is the same process we started (guards against pid reuse)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def stop_group(pgid: int, *, grace: float, poll: float = 0.1) -> bool:
    """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL what is left.

    Returns True when no member is left alive. Blocks for at most ``grace`` + ~2 s.
    """
    if not group_members(pgid):
        return True
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(poll)
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(poll)
    return not group_members(pgid)


#: How long a runner keeps retrying what must be recorded while the database is away (a run's output,
#: its final state). A live runner on this host is trusted for as long: a database outage must not
#: get its run reaped for silence.
DATABASE_PATIENCE_SECONDS = 3600.0


def runner_alive(runner_pid: int | None, claimed_at: datetime | None) -> bool:
    """True when the worker process that claimed a run is still alive on this host: its pid exists,
    is not this process, and the process is older than the claim (a recycled pid is younger)."""
    if not runner_pid or runner_pid == os.getpid():
        return False
    try:
        proc = psutil.Process(runner_pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return claimed_at is None or proc.create_time() <= claimed_at.timestamp() + 1.0
    except psutil.Error:
        return False


def supervision_lost(
    *, holder_host: str, runner_pid: int | None, claimed_at: datetime | None, silent_for: float, pid: int | None,
    process_started: float | None, this_host: str, stale_after: float,
) -> tuple[bool, float] | None:
    """Whether the supervision of a running process is gone, for the reconcilers of tasks, exports
    and deployments. ``None``: it is fine. Otherwise ``(here, silent_for)``:

    * on this host it is lost when its runner (the worker process that claimed it at ``claimed_at``)
      is gone, or has been silent for longer than ``DATABASE_PATIENCE_SECONDS`` (a runner keeps its
      run through a database outage, so silence alone is not death); the swift group it left behind
      (same pid *and* start time, so a recycled pid is never touched) is stopped here and now;
    * on another host it is lost when that host has been silent for three times ``stale_after``.

    ``silent_for``: seconds since the runner's last heartbeat by the database's clock (the caller
    annotates ``Now() - F("heartbeat_at")``; ``inf`` when it never beat). Heartbeats are written with
    ``Now()`` too, so neither skew between hosts nor a clock step on one of them counts as silence.
    """
    from django.conf import settings

    if holder_host == this_host:
        if runner_alive(runner_pid, claimed_at) and silent_for < max(stale_after, DATABASE_PATIENCE_SECONDS):
            return None
        if process_matches(pid, process_started):
            stop_group(pid, grace=settings.FINETUNE_STOP_GRACE_SECONDS)
        return True, silent_for
    if silent_for > 3 * stale_after:
        return False, silent_for
    return None


def stop_launched(proc: Any) -> None:
    """Leave no process of a launched group alive (every runner calls it on every exit path)."""
    from django.conf import settings

    if proc is None:
        return
    if proc.poll() is None or group_members(proc.pid):
        stop_group(proc.pid, grace=settings.FINETUNE_STOP_GRACE_SECONDS)


# --- running as another user -------------------------------------------------------------------
def run_as_user() -> pwd.struct_passwd | None:
    """The OS user ``FINETUNE_RUN_AS`` names (a name or a numeric uid), or None when it is unset.

    Raises :class:`LaunchError` in plain words when the user does not exist or this worker cannot
    start processes as another user (it must run as root)."""
    from django.conf import settings

    name = (settings.FINETUNE_RUN_AS or "").strip()
    if not name:
        return None
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise LaunchError(f"FINETUNE_RUN_AS names the user {name!r}, which does not exist on this host: "
                          "create it, or unset FINETUNE_RUN_AS.") from None
    if os.geteuid() != 0:
        raise LaunchError(f"FINETUNE_RUN_AS asks to run swift as {entry.pw_name!r}, but this worker runs as uid "
                          f"{os.geteuid()} and cannot switch users: run the worker as root, or unset "
                          "FINETUNE_RUN_AS.")
    return entry


def _output_dir(argv: list[str]) -> Path | None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--output_dir":
            return Path(value)
    return None


def _give(path: str, uid: int, gid: int) -> None:
    """chown one entry without ever following a link. The entry is opened first (``O_NOFOLLOW``) and
    changed through its descriptor, so a job swapping it meanwhile changes nothing else; a file with
    more than one hard link is left alone (it may be a link the job planted to a file outside)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: change the link itself
            os.chown(path, uid, gid, follow_symlinks=False)
        elif exc.errno != errno.ENXIO:  # ENXIO: a socket, nothing to hand over
            raise
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
            return
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def hand_over(folder: Path, uid: int, gid: int) -> None:
    """Give ``folder`` and everything in it to ``uid:gid`` (links are never followed)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    _give(str(folder), uid, gid)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            _give(os.path.join(dirpath, name), uid, gid)


def run_as_popen_kwargs(*, argv: list[str], workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """What ``subprocess.Popen`` needs to start a run as the ``FINETUNE_RUN_AS`` user; ``{}`` when it
    is unset. Raises :class:`LaunchError` when it cannot.

    The user gets the folders the process writes: the run's ``cache`` (temp files, preprocessing,
    its home), the ``--output_dir`` swift writes (or, for a merged folder that does not exist yet, the
    folder it goes into) and the shared hub download cache. The run's folder itself and its log stay
    the worker's: the job cannot swap the log file for a link the worker would then follow.
    ``env`` gets ``HOME``, ``USER`` and ``LOGNAME`` of that user (its home is in the run's cache).
    """
    from django.conf import settings

    entry = run_as_user()
    if entry is None:
        return {}
    uid, gid = entry.pw_uid, entry.pw_gid
    home = workdir / "cache" / "home"
    home.mkdir(parents=True, exist_ok=True)
    writable = [workdir / "cache", settings.HUB_CACHE_DIR]
    output = _output_dir(argv)
    if output is not None:
        writable.append(output if output.exists() else output.parent)
    try:
        for folder in writable:
            hand_over(Path(folder), uid, gid)
    except OSError as exc:
        raise LaunchError(f"Could not give the run's folders to the FINETUNE_RUN_AS user {entry.pw_name!r}: "
                          f"{exc.strerror or exc} ({exc.filename})") from None
    env.update({"HOME": str(home), "USER": entry.pw_name, "LOGNAME": entry.pw_name})
    return {"user": uid, "group": gid, "extra_groups": []}


# --- worker shutdown ----------------------------------------------------------------------------
# The worker's main process sets a flag in shared memory that every forked worker process sees; a
# runner polls it with its stop requests, so a Ctrl-C or SIGTERM to the worker stops each swift group
# and records why, instead of orphaning the processes. Lock-free on purpose: a multiprocessing.Event
# takes a lock, and taking a lock in a signal handler is how django-q2's own handler deadlocks.
_shutdown_shared: Any = None
_shutdown_signalled = False


def worker_shutdown_prepare() -> None:
    """Create the shared flag; the worker calls this before its cluster forks the worker processes."""
    global _shutdown_shared
    _shutdown_shared = multiprocessing.get_context("fork").RawValue(ctypes.c_bool, False)


def worker_shutdown_begin() -> None:
    """Tell every runner of this worker to stop its process and conclude (main process)."""
    global _shutdown_signalled
    _shutdown_signalled = True
    if _shutdown_shared is not None:
        _shutdown_shared.value = True


def worker_shutting_down() -> bool:
    return _shutdown_signalled or (_shutdown_shared is not None and bool(_shutdown_shared.value))


def _on_sigterm(_signum: int, _frame: Any) -> None:
    global _shutdown_signalled, _sigterm_received
    _shutdown_signalled = _sigterm_received = True  # only assignments here: the runner's loop does the rest


_sigterm_received = False


@contextmanager
def sigterm_means_shutdown() -> Iterator[None]:
    """While a runner supervises a process, a SIGTERM sent straight to its worker process (a signal to
    the whole process group, systemd's default stop) reads as a worker shutdown instead of killing
    the runner at once and orphaning swift. Only the main thread can set signal handlers; runners
    driven from a thread (tests) keep the default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if _sigterm_received:
            # The run is concluded; now end this process as the signal asked (it must not take the
            # next job believing it is shutting down).
            os.kill(os.getpid(), signal.SIGTERM)

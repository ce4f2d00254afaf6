"""Process-group helpers shared by training, export and deployment runners.

``swift`` is a wrapper that starts the real trainer (or torchrun, or uvicorn) as a child; a signal
to the wrapper alone orphans the child, which keeps the GPU or the port. Every launch therefore
starts a new session (its own process group) and every stop signals the whole group.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil


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


def supervision_lost(
    *, holder_host: str, runner_pid: int | None, heartbeat_at: Any, pid: int | None,
    process_started: float | None, this_host: str, stale_after: float,
) -> tuple[bool, float] | None:
    """Whether the supervision of a running process is gone, for the reconcilers of tasks, exports
    and deployments. ``None``: it is fine. Otherwise ``(here, silent_for)``:

    * on this host it is lost when its runner (a worker process) is gone or has been silent for
      ``stale_after`` seconds; the swift group it left behind (same pid *and* start time, so a
      recycled pid is never touched) is stopped here and now;
    * on another host it is lost when that host has been silent for three times as long.
    """
    from django.conf import settings
    from django.utils import timezone

    silent_for = (timezone.now() - heartbeat_at).total_seconds() if heartbeat_at else float("inf")
    if holder_host == this_host:
        runner_alive = bool(runner_pid) and psutil.pid_exists(runner_pid) and runner_pid != os.getpid()
        if runner_alive and silent_for < stale_after:
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

"""Process-group helpers shared by training, export and deployment runners.

``swift`` is a wrapper that starts the real trainer (or torchrun, or uvicorn) as a child; a signal
to the wrapper alone orphans the child, which keeps the GPU or the port. Every launch therefore
starts a new session (its own process group) and every stop signals the whole group.
"""

from __future__ import annotations

import os
import signal
import time

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

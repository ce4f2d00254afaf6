"""``make run``: this host's worker and daphne, started together and stopped together.

Both run in process groups of their own, so a Ctrl-C in the terminal reaches only this launcher,
which then stops them in order: SIGTERM to daphne and to the worker's main process (the worker
stops its runners, which stop their swift process groups and record why), a bounded wait, then
SIGKILL for anything still alive, swift groups included. A second Ctrl-C skips the wait. If either
server exits on its own, the other is stopped too and the launcher exits non-zero.

Environment: ``PY`` (the platform's Python, default this interpreter), ``HOST``, ``PORT``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
#: The worker bounds its own shutdown (runners get 5 s, the cluster 15 s, the GPU agent 5 s).
WORKER_STOP_SECONDS = 30.0
WEB_STOP_SECONDS = 10.0


class Signals:
    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.count += 1


def descendants(procs: list[subprocess.Popen[bytes]]) -> dict[int, psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.Error:
            continue
    return found


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_all(known: dict[int, psutil.Process]) -> list[int]:
    """SIGKILL every remembered process still alive (``is_running`` compares start times, so a
    recycled pid is never hit); a process leading its own group takes the group with it."""
    killed = []
    for pid, proc in known.items():
        if not alive(proc):
            continue
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                proc.kill()
            killed.append(pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return killed


def main() -> int:
    py = os.environ.get("PY") or sys.executable
    host = os.environ.get("HOST", "127.0.0.1")
    port = os.environ.get("PORT", "8000")
    signals = Signals()
    servers = {
        "worker": subprocess.Popen([py, "manage.py", "worker"], cwd=REPO, start_new_session=True),
        "web": subprocess.Popen(
            [py, "-m", "daphne", "-b", host, "-p", port, "finetune_platform.asgi:application"],
            cwd=REPO, start_new_session=True,
        ),
    }
    data = os.environ.get("FINETUNE_DATA_DIR") or "./data"
    signup = (
        f"  - sign up at        http://{host}:{port}/accounts/signup/\n"
        if os.environ.get("FINETUNE_SIGNUP", "open").strip().lower() != "closed"
        else "  - sign-up is closed: an operator creates accounts in the admin\n"
    )
    print(
        f"\n  Finetune Platform is starting on http://{host}:{port}/\n"
        f"{signup}"
        f"  - API docs at       http://{host}:{port}/api/docs/\n"
        f"  - first admin:      {py} manage.py createsuperuser   (then http://{host}:{port}/admin/)\n"
        f"  Data (database, workspaces, logs) lives in {data}. Ctrl-C stops everything.\n",
        flush=True,
    )
    known = descendants(list(servers.values()))
    exit_code = 0
    beat = 0
    while not signals.count:
        ended = [name for name, proc in servers.items() if proc.poll() is not None]
        if ended:
            name = ended[0]
            print(f"\nThe {name} process exited with code {servers[name].returncode}; stopping the rest.", flush=True)
            exit_code = 1
            break
        time.sleep(0.2)
        beat += 1
        if beat % 10 == 0:  # every 2 s: remember new processes (a swift run), so none is left behind
            known.update(descendants(list(servers.values())))

    print("\nStopping the web server and the worker (running tasks are stopped) …", flush=True)
    known.update(descendants(list(servers.values())))
    for proc in servers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the main process only: each stops its own children in order
    first = signals.count
    limits = {"web": WEB_STOP_SECONDS, "worker": WORKER_STOP_SECONDS}
    deadlines = {name: time.monotonic() + limit for name, limit in limits.items()}
    while any(proc.poll() is None for proc in servers.values()):
        if signals.count > first:
            print("Second signal: killing what is left now.", flush=True)
            break
        now = time.monotonic()
        for name, proc in servers.items():
            if proc.poll() is None and now > deadlines[name]:
                print(f"The {name} process did not stop within {limits[name]:.0f} s; killing it.", flush=True)
                kill_all({pid: p for pid, p in known.items() if pid == proc.pid})
        time.sleep(0.1)
    known.update(descendants(list(servers.values())))
    killed = kill_all(known)
    for proc in servers.values():
        proc.wait()
    print(f"Stopped{f' (killed {len(killed)} leftover process(es))' if killed else ''}.", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

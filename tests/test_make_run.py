"""``make run`` in a real pseudo-terminal, as a newcomer runs it: a Ctrl-C typed into the terminal
(the tty driver sends SIGINT to the whole foreground process group) stops daphne, the worker, the GPU
agent and the swift process of a running task within seconds, and leaves no process behind.

The platform runs on its embedded default (SQLite in a fresh data folder, no Redis) with the fake
``swift``; the test database of the suite is not involved.
"""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAKE_SWIFT, REPO, wait_for

pytestmark = pytest.mark.timeout(300)

CREATE_TASK = """
from django.contrib.auth.models import User
from tasks import services
from gpus.scheduler import dispatch as dispatch_pending
owner = User.objects.create_user("newcomer", password="newcomer-pass-123")
task = services.finetuning_task_create(
    owner=owner, name="pty", base_model={model!r}, datasets=["builtin:smoke_sft"], gpu_config={{}},
    training_args={{"max_steps": 2000, "logging_steps": 1, "save_steps": 1000, "model_type": "qwen2",
                    "template": "qwen2_5"}},
)
dispatch_pending()
print("TASK", task.pk)
"""

READ_TASK = """
from tasks.models import FinetuningTask
task = FinetuningTask.objects.get(pk={pk})
print("STATUS", task.status)
print("ERROR", task.error_message.splitlines()[0] if task.error_message else "")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newcomer_env(root: Path, port: int) -> dict[str, str]:
    """A clean environment: none of the test run's database, broker or settings variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FINETUNE_", "DATABASE_URL", "REDIS_URL", "DJANGO_", "CHANNELS_", "Q_"))}
    models = root / "models"
    (models / "fake-model").mkdir(parents=True)
    (models / "fake-model" / "config.json").write_text('{"model_type": "qwen2"}')
    env.update({
        "FINETUNE_DATA_DIR": str(root / "data"), "FINETUNE_MODEL_ROOTS": str(models), "FINETUNE_OFFLINE": "1",
        "FINETUNE_SWIFT_BIN": str(FAKE_SWIFT), "FINETUNE_ENV_PASSTHROUGH": "FAKE_SWIFT_*",
        "FAKE_SWIFT_STEP_SECONDS": "0.5", "FAKE_SWIFT_SPAWN_CHILD": "1", "PORT": str(port), "TERM": "dumb",
    })
    return env


def manage(env: dict[str, str], code: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Terminal:
    """``make run`` as the foreground job of a pseudo-terminal's session."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the session leader, with the pty as its controlling terminal
            os.chdir(REPO)
            os.execvpe("make", ["make", "run", f"PORT={port}"], env)
        self.output = bytearray()
        self.exit_status: int | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of the run, for the cleanup
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def processes(self) -> list[psutil.Process]:
        """make's descendants now (daphne and the worker run in sessions of their own), remembered."""
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            found = []
        self.seen.update({p.pid: p for p in found})
        return found

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def type_ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def exited(self) -> bool:
        if self.exit_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.exit_status = status
        return self.exit_status is not None

    def close(self) -> None:
        """Whatever the test did: stop the run as a user would, then kill every process it had
        (the servers' own sessions included), so a failed test leaves nothing running."""
        if not self.exited():
            self.processes()
            self.type_ctrl_c()
            deadline = time.monotonic() + 40
            while not self.exited() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.exited():
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        for pid, proc in self.seen.items():
            try:
                if alive(proc):
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        proc.kill()
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        os.close(self.fd)


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def command_of(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # ended meanwhile (a short-lived helper process)
        return ""


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_in_the_terminal_stops_make_run_and_every_process_it_started(tmp_path: Path) -> None:
    port = free_port()
    env = newcomer_env(tmp_path, port)
    term = Terminal(env, port)
    try:
        wait_for(lambda: accepts(port) or term.exited(), timeout=180, interval=0.3)
        assert not term.exited(), term.text()
        # The worker's GPU agent announces this host (one CPU slot) shortly after start-up.
        created = wait_for(lambda: _try_create(env), timeout=60, interval=1)
        pk = int(created.split("TASK", 1)[1].split()[0])

        def swift_with_child() -> psutil.Process | None:
            for proc in term.processes():
                try:
                    if "fake_swift.py" in command_of(proc) and proc.children():
                        return proc
                except psutil.Error:  # ended meanwhile
                    continue
            return None

        swift = wait_for(swift_with_child, timeout=90)
        everything = term.processes()
        names = " ".join(command_of(p) for p in everything)
        assert "daphne" in names and "manage.py worker" in names and "gpu_agent" in names, names
        assert swift in everything

        started = time.monotonic()
        term.type_ctrl_c()
        wait_for(term.exited, timeout=60, interval=0.2)
        took = time.monotonic() - started

        left = [p for p in everything if alive(p)]
        assert not left, f"left behind: {[(p.pid, command_of(p)) for p in left]}\n{term.text()}"
        assert took < 25, f"Ctrl-C took {took:.1f} s\n{term.text()}"
        assert not accepts(port)
        assert "Stopped" in term.text(), term.text()
        state = manage(env, READ_TASK.format(pk=pk))
        assert "STATUS failed" in state and "was shut down (Ctrl-C or SIGTERM)" in state, state
    finally:
        term.close()


def _try_create(env: dict[str, str]) -> str | None:
    done = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                           CREATE_TASK.format(model=env["FINETUNE_MODEL_ROOTS"] + "/fake-model")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode == 0 and "TASK" in done.stdout else None

"""Shared fixtures: users, API clients, the fake and the real ``swift``, a real worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import translation
from rest_framework.test import APIClient

from accounts.services import api_token_create

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAKE_SWIFT = FIXTURES / "fake_swift.py"
SWIFT_PYTHON = REPO / ".venv-swift" / "bin" / "python"
TINY_MODEL_BUILDER = REPO / "tasks" / "builtin_models" / "tiny_qwen2.py"  # the platform's builtin:tiny-qwen2

sys.path.insert(0, str(FIXTURES))
from make_datasets import write_datasets  # noqa: E402


@pytest.fixture(autouse=True)
def _default_language() -> Iterator[None]:
    """Start every test in the default language: Django leaves a request's language active in its
    thread after the response, and service messages are translated into whatever is active."""
    translation.activate(settings.LANGUAGE_CODE)
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def _own_workspaces(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Give every test its own workspaces folder (datasets, logs, outputs), in this process and in the
    workers and servers it starts (they inherit the environment). SQLite hands out the same ids again
    after each rolled-back test, so a shared folder let one test find the previous test's files in
    "its" ``workspaces/<user>/tasks/<id>/``."""
    folder = tmp_path_factory.mktemp("data") / "workspaces"
    folder.mkdir()
    monkeypatch.setattr(settings, "WORKSPACES_DIR", folder)
    monkeypatch.setenv("FINETUNE_WORKSPACES_DIR", str(folder))
    yield folder


# --- users and clients ---------------------------------------------------------------------------
@pytest.fixture
def alice(db: None) -> User:
    return User.objects.create_user("alice", "alice@example.com", "alice-pass-123")


@pytest.fixture
def bob(db: None) -> User:
    return User.objects.create_user("bob", "bob@example.com", "bob-pass-123")


@pytest.fixture
def staff(db: None) -> User:
    return User.objects.create_user("olga", "olga@example.com", "olga-pass-123", is_staff=True, is_superuser=True)


def token_client(user: User) -> APIClient:
    _, raw = api_token_create(user=user, name="tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    return client


@pytest.fixture
def alice_api(alice: User) -> APIClient:
    return token_client(alice)


@pytest.fixture
def bob_api(bob: User) -> APIClient:
    return token_client(bob)


@pytest.fixture
def staff_api(staff: User) -> APIClient:
    return token_client(staff)


# --- files ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_datasets(tmp_path_factory.mktemp("datasets"), rows=64)


@pytest.fixture(scope="session")
def model_root() -> Path:
    return settings.FINETUNE_MODEL_ROOTS[0]


@pytest.fixture
def local_model(model_root: Path) -> Path:
    """A folder inside the model root that looks like a model (enough for the fake swift)."""
    path = model_root / "fake-model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    return path


@pytest.fixture(scope="session")
def tiny_model(model_root: Path) -> Path:
    """A tiny random Qwen2 model + tokenizer built offline by the swift venv (~6 s, once)."""
    out = model_root / "tiny-qwen2"
    if not SWIFT_PYTHON.exists():
        pytest.fail(f"the swift venv is missing ({SWIFT_PYTHON}); run `make install` first")
    subprocess.run([str(SWIFT_PYTHON), str(TINY_MODEL_BUILDER), str(out)], check=True, timeout=300)
    return out


def upload(client: APIClient, path: Path, name: str | None = None) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = client.post("/api/finetuning/datasets/", {"file": handle, "name": name or path.stem},
                               format="multipart")
    assert response.status_code == 201, response.content
    return response.json()


# --- the compute inventory ----------------------------------------------------------------------
def announce_host(name: str | None = None, spec: str = "", cpu: int = 0) -> Any:
    """Record a live host as its GPU agent would: ``spec`` is a fake inventory ("2x80", "80,24"),
    ``cpu`` its CPU slots. The default name is this process's FINETUNE_HOST (where run_task claims)."""
    from gpus.inventory import Discovery, parse_fake_gpus
    from gpus.models import Host
    from gpus.services import host_announce

    name = name or settings.FINETUNE_HOST
    gpus = parse_fake_gpus(spec, name) if spec else []
    host_announce(name=name, discovery=Discovery("fake" if spec else "none", gpus), cpu_slots=cpu)
    return Host.objects.get(name=name)


@pytest.fixture
def cpu_host(db: None) -> Any:
    """This host, live, with one CPU slot and no GPU (the embedded default on a laptop or CI)."""
    return announce_host(cpu=1)


# --- the fake swift ------------------------------------------------------------------------------
@pytest.fixture
def fake_swift(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Point the platform at the fake ``swift``; call the fixture to set its FAKE_SWIFT_* knobs."""
    settings.FINETUNE_SWIFT_BIN = str(FAKE_SWIFT)
    monkeypatch.setenv("FAKE_SWIFT_STEP_SECONDS", "0.01")

    def configure(**knobs: Any) -> None:
        for key, value in knobs.items():
            monkeypatch.setenv(f"FAKE_SWIFT_{key.upper()}", str(value))

    return configure


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# --- a real worker (django-q2 cluster) on the test database -------------------------------------
def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else (f"{user}@" if user else "")
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def stop_server(proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Stop a server subprocess started with ``start_new_session``: SIGTERM to its main process
    only (a django-q2 cluster stops its children in order; a SIGTERM to the whole group wedges its
    shutdown), then SIGKILL to the whole group if it has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for_server_sessions_to_close(timeout: float = 10.0) -> None:
    """PostgreSQL ends a killed client's session a moment after the process is gone; wait for that,
    so dropping the test database at the end of the run does not find "other users" on it."""
    if connection.vendor != "postgresql":
        return
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.1)


@pytest.fixture
def worker(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``manage.py worker`` (reconcile + django-q2 cluster) against the test database."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "DATABASE_URL": _database_url(), "FINETUNE_SWIFT_BIN": settings.FINETUNE_SWIFT_BIN,
                    **env}
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "manage.py", "worker"], cwd=REPO, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    from gpus.models import Run
    from gpus.process import process_matches, stop_group

    for proc in procs:
        stop_server(proc, timeout=15)
    # Never leave a swift process behind, whatever the test did (a run of any kind and state).
    for run in Run.objects.exclude(pid__isnull=True):
        if process_matches(run.pid, run.process_started):
            stop_group(run.pid, grace=2)
    wait_for_server_sessions_to_close()

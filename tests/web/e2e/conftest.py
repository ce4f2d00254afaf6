"""Browser tests: a real daphne server on the test database, a real worker, Playwright driving the
system Chromium (never ``playwright install``).

Run them in their own process (Playwright's sync API runs an event loop, so Django's async-safety
check must be relaxed, and it must not meet pytest-asyncio's loop)::

    .venv/bin/python -m pytest -m e2e tests/web/e2e
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from tests.conftest import REPO, _database_url, stop_server, wait_for_server_sessions_to_close

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(autouse=True)
def allow_sync_orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are still
    plain synchronous code (only for the e2e run, never for the rest of the suite)."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (`apt-get install -y chromium`); "
            "the browser tests never download a browser"
        )
    return str(CHROMIUM)


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - say clearly what is wrong with the system browser
            pytest.fail(f"Playwright could not start {chromium_path}: {exc}")
        yield instance
        instance.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of the web server (and the worker): the test database and settings."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(),
        "DJANGO_ALLOW_ASYNC_UNSAFE": "",
        **extra,
    }


@pytest.fixture
def web_server(transactional_db: None, tmp_path: Path) -> Iterator[Any]:
    """Start daphne (``finetune_platform.asgi``) on a free port against the test database; call the
    fixture with extra environment variables, get back the base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        full_env = server_env(**env)
        subprocess.run(
            [sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
            cwd=REPO,
            env=full_env,
            check=True,
            timeout=120,
        )
        port = _free_port()
        log = (tmp_path / f"daphne-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "finetune_platform.asgi:application"],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daphne exited: {(tmp_path / f'daphne-{port}.log').read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            time.sleep(0.1)
        raise AssertionError("daphne did not start within 30 s")

    yield start
    for proc in procs:
        stop_server(proc, timeout=10)
    wait_for_server_sessions_to_close()
    # With Playwright's event loop in this thread, the ORM connections opened here live in a
    # context Django's own teardown does not close; close them, or dropping the test database
    # at the end of the run finds them still "using" it.
    connections.close_all()

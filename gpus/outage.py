"""Database outages, survived: a run's supervision never dies because the database went away.

A PostgreSQL restart, a killed connection or SQLite locked past its busy timeout makes every write
fail for a while. The supervisors and the progress publisher keep their process running and retry
with :class:`Backoff`; a failed write drops the connection so that the next try reconnects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import DatabaseError, connection

from gpus.process import DATABASE_PATIENCE_SECONDS, worker_shutting_down

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Backoff:
    """When to try the database again after failures: ``first`` seconds, doubling up to ``cap``.

    The cap is short on purpose: a try costs one connection attempt, and the sooner a runner writes
    its heartbeat after an outage, the less a sweep can take the silence for a dead runner."""

    FIRST = 0.5
    CAP = 5.0

    def __init__(self, *, first: float | None = None, cap: float | None = None) -> None:
        self.first = self.FIRST if first is None else first
        self.cap = self.CAP if cap is None else cap
        self.failures = 0
        self.down_since: float | None = None
        self._next_try = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._next_try

    def wait(self) -> None:
        """Sleep until the next try is due."""
        time.sleep(max(0.0, self._next_try - time.monotonic()))

    def failed(self, *, since: float | None = None) -> float:
        """Record a failure of an operation begun at ``since`` (monotonic; default now: a write may
        wait out SQLite's busy timeout before it fails); returns the delay before the next try."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now if since is None else since
        delay = min(self.cap, self.first * 2 ** min(self.failures, 16))
        self.failures += 1
        self._next_try = now + delay
        return delay

    def succeeded(self) -> float | None:
        """Record a success; returns for how long the database had been failing (None: it had not)."""
        down = None if self.down_since is None else time.monotonic() - self.down_since
        self.failures, self.down_since, self._next_try = 0, None, 0.0
        return down


def database_failed(exc: DatabaseError, *, what: str, backoff: Backoff, since: float | None = None) -> None:
    """Record a failed database operation and drop the connection, so the next try reconnects (a
    killed PostgreSQL connection stays unusable otherwise). Inside a transaction opened by a caller
    the connection is left alone: only that caller may end it."""
    delay = backoff.failed(since=since)
    if backoff.failures == 1:
        logger.warning("%s failed (%s: %s); the run goes on, retrying with backoff", what,
                       type(exc).__name__, str(exc).strip())
    elif backoff.failures % 12 == 0 and backoff.down_since is not None:  # about once a minute
        logger.warning("%s still fails after %.0f s (%s); the run goes on, retrying", what,
                       time.monotonic() - backoff.down_since, str(exc).strip())
    else:
        logger.debug("%s failed again (%s); next try in %.1f s", what, exc, delay)
    if connection.in_atomic_block:
        return
    try:
        connection.close()
    except DatabaseError:
        pass  # closing a dead connection may complain; it is closed either way


def retry_database(write: Callable[[], T], *, what: str, backoff: Backoff | None = None) -> T:
    """``write()``, tried again with backoff for as long as the database fails (up to
    ``DATABASE_PATIENCE_SECONDS``, and not once the worker is shutting down: then the error is
    raised and the reconciler records the ending)."""
    backoff = backoff or Backoff()
    give_up_at = time.monotonic() + DATABASE_PATIENCE_SECONDS
    while True:
        started = time.monotonic()
        try:
            result = write()
        except DatabaseError as exc:
            database_failed(exc, what=what, backoff=backoff, since=started)
            if time.monotonic() >= give_up_at or worker_shutting_down():
                raise
            backoff.wait()
            continue
        down = backoff.succeeded()
        if down is not None:
            logger.warning("The database is back after %.0f s: %s succeeded", down, what)
        return result


def stop_requested(model: Any, pk: int, *, backoff: Backoff, what: str) -> bool:
    """Whether the row ``model(pk)`` asks for a stop (or is gone: only an operator's raw delete does
    that). While the database is away the answer is False: no stop was asked that we know of, and a
    run is never stopped for an outage. Reads wait for ``backoff`` after a failure."""
    if not backoff.ready():
        return False
    try:
        row = model.objects.filter(pk=pk).values("stop_requested_at").first()
    except DatabaseError as exc:
        database_failed(exc, what=what, backoff=backoff)
        return False
    backoff.succeeded()
    return row is None or row["stop_requested_at"] is not None

#!/usr/bin/env python
"""Fair share at the dispatcher (issue 12): who gets the GPUs, and what one dispatch costs with a long
queue.

1. **Who gets the GPUs.** 8 free GPUs; user A queued 500 tasks first, then 7 other users queued 2
   each. Strict first-come-first-served (the rule before issue 12) gives A all 8; fair share gives each
   user one. And the M9 case of docs/security-review: A's 501 tasks pinned to a busy GPU 0, B's task
   asking for any GPU with GPU 1 free: B starts.
2. **Cost.** 50 users × 200 waiting tasks (10,000 waiting runs: the default ``max_waiting_tasks`` for
   each) on 8 GPUs: the time and the SQL queries of a dispatch that books 8 runs, and of one that
   books nothing (every GPU taken): p50 / p95.

Runs are created directly (the dispatcher only reads ``gpus.Run``); the host is a fake 8-GPU host.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ftp_bench_fair .venv/bin/python bench/fairshare.py

DATABASE_URL must be PostgreSQL whose database name contains "bench" (it is dropped and created).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/ftp_bench_fair"


def fresh_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if "bench" not in name:
        raise SystemExit(f"refusing to drop the database {name!r}: its name must contain 'bench'")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed dispatches of each kind (default 20)")
    opts = parser.parse_args()
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("DATABASE_URL must be a PostgreSQL URL")
    fresh_database(url)
    work = Path(tempfile.mkdtemp(prefix="ftp-bench-fair-"))
    os.environ.update({
        "DATABASE_URL": url, "FINETUNE_DATA_DIR": str(work / "data"), "FINETUNE_GPU_BACKEND": "fake",
        "DEBUG": "0", "DJANGO_SETTINGS_MODULE": "finetune_platform.settings", "FINETUNE_HOST": "bench-host",
    })

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from gpus.inventory import Discovery, parse_fake_gpus
    from gpus.models import Reservation, Run, RunKind, RunStatus
    from gpus.scheduler import dispatch
    from gpus.services import host_announce

    call_command("migrate", verbosity=0)

    def announce() -> None:
        host_announce(name="bench-host", discovery=Discovery("fake", parse_fake_gpus("8x80", "bench-host")),
                      cpu_slots=0)

    def users(n: int, prefix: str) -> list[Any]:
        return [User.objects.create_user(f"{prefix}{i}", password="bench-pass-123") for i in range(n)]

    def queue(owner: Any, count: int, *, gpu_config: dict[str, Any] | None = None, start: int = 0) -> None:
        base = timezone.now() - timezone.timedelta(hours=1)
        runs = [Run(kind=RunKind.TRAIN, subject_id=10**6 + start + i, owner=owner,
                    gpu_config=gpu_config or {"count": 1}, label=f"{owner.username}-{i}") for i in range(count)]
        Run.objects.bulk_create(runs)
        with connection.cursor() as cursor:  # in queue order, one second apart
            cursor.execute(
                "UPDATE gpus_run SET created_at = %s + (id - %s) * interval '1 second' WHERE id BETWEEN %s AND %s",
                [base, runs[0].pk - start, runs[0].pk, runs[-1].pk])

    def reset() -> None:
        Reservation.objects.all().delete()
        Run.objects.update(status=RunStatus.PENDING, host="", queued_at=None, master_port=None, wait_reason="")
        announce()

    def booked_by_owner() -> Counter[str]:
        return Counter(Run.objects.filter(status=RunStatus.QUEUED).values_list("owner__username", flat=True))

    announce()
    # 1. Who gets the GPUs.
    heavy, *light = users(8, "fair")
    queue(heavy, 500)
    for n, user in enumerate(light):
        queue(user, 2, start=1000 + n * 2)
    dispatch()
    fair = booked_by_owner()
    print("1. 8 free GPUs; fair0 queued 500 tasks first, fair1-fair7 2 each after:")
    print(f"   fair share books {dict(sorted(fair.items()))}")
    print("   strict first-come-first-served would book {'fair0': 8}")
    Run.objects.all().delete()
    Reservation.objects.all().delete()
    busy, pinned, other = users(3, "m9-")
    queue(busy, 1, gpu_config={"devices": "0"})
    dispatch()  # GPU 0 is busy from now on
    queue(pinned, 501, gpu_config={"devices": "0"}, start=10)
    queue(other, 1, gpu_config={"count": 1}, start=600)
    dispatch()
    started = booked_by_owner()
    print(f"   M9: 501 tasks pinned to busy GPU 0, then one asking for any GPU: started {dict(started)}"
          f" ({'the other user starts' if started.get('m9-2') == 1 else 'STARVED'})")
    Run.objects.all().delete()
    Reservation.objects.all().delete()

    # 2. Cost of a dispatch with 10,000 waiting runs of 50 users.
    crowd = users(50, "crowd")
    for n, user in enumerate(crowd):
        queue(user, 200, start=n * 200)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    books, idle = [], []
    queries_books = queries_idle = 0
    for _ in range(opts.runs):
        reset()
        with CaptureQueriesContext(connection) as ctx:
            t0 = time.perf_counter()
            ids = dispatch()
            books.append(time.perf_counter() - t0)
        queries_books = len(ctx.captured_queries)
        assert len(ids) == 8, ids
        with CaptureQueriesContext(connection) as ctx:
            t0 = time.perf_counter()
            assert dispatch() == []
            idle.append(time.perf_counter() - t0)
        queries_idle = len(ctx.captured_queries)
    with transaction.atomic():
        owners = booked_by_owner()
    print(f"2. 50 users x 200 waiting runs = {Run.objects.count():,} runs, 8 GPUs ({opts.runs} dispatches each):")
    print(f"   dispatch booking 8 runs : p50 {statistics.median(books) * 1000:6.1f} ms, "
          f"p95 {pct(books, 0.95) * 1000:6.1f} ms, {queries_books} queries; booked {len(owners)} different users")
    print(f"   dispatch booking none   : p50 {statistics.median(idle) * 1000:6.1f} ms, "
          f"p95 {pct(idle, 0.95) * 1000:6.1f} ms, {queries_idle} queries")


if __name__ == "__main__":
    main()

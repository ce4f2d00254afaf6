#!/usr/bin/env python
"""Whether the task lists and the task page stay fast at scale: 100,000 tasks (50,000 of them the
caller's, the rest spread over 49 other users), 1,000,000 metric points and 10,000,000 log lines.

The database is created and migrated, then seeded with set-based SQL (``INSERT … SELECT
generate_series``: 1-2 minutes in all on a 2-core machine, see bench/README.md); a seed left by an
earlier run is reused (``--reseed`` drops the database and seeds again). Each request is then made
with Django's test ``Client`` as the caller (a plain user) and timed: p50/p95 against the issue's
targets, and the number of SQL queries it made.

    .venv/bin/python bench/scale.py [--runs 50] [--reseed]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ftp_scale .venv/bin/python bench/scale.py

DATABASE_URL must be PostgreSQL (default postgres://postgres@127.0.0.1:5432/ftp_scale); the database
must be one the bench may own (its name contains "scale" or "bench"). Uses a throw-away data dir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/ftp_scale"
#: Bump when the seed's shape changes: an older seed is then not reused.
SEED_VERSION = 2

TASKS = 100_000
CALLER_TASKS = 50_000  # every even-numbered task
OTHER_USERS = 49
METRIC_TASKS = 9_000  # each with METRIC_POINTS points …
METRIC_POINTS = 100
BIG_METRIC_POINTS = 100_000  # … plus the one big task: 1,000,000 in all
LOG_TASKS = 10_000  # each with LOG_LINES lines: 10,000,000 in all
LOG_LINES = 1_000
#: The caller's task with 100,000 metric points (numbered like the others: 1 … TASKS, oldest first).
BIG = TASKS - 8  # even (the caller's), completed, not among the every-tenth tasks

#: The issue's targets (p95, seconds; None: none, measured for information) and what was measured at
#: commit 830da25 on the same kind of machine.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "api list": (0.050, 0.177),
    "api list ?page=2000": (0.050, 0.199),
    "api list, last page": (0.050, None),
    "api list ?status=failed, p.100": (0.050, None),
    "getTaskList": (0.050, 0.182),
    "getTaskList ?page=4000": (0.050, None),
    "list page": (0.150, None),
    "list page ?page=2000": (0.150, None),
    "detail page (100k metrics)": (0.150, None),
    "metrics api (100k task)": (None, None),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def ensure_database(url: str, *, reseed: bool) -> None:
    """Create the database (drop it first with ``--reseed``), connected to the server's ``postgres``."""
    import psycopg

    name = database_name(url)
    if not name or not ("scale" in name or "bench" in name):
        raise SystemExit(f"refusing to use the database {name!r}: its name must contain 'scale' or 'bench'")
    parts = urlsplit(url)
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists and reseed:
            print(f"dropping database {name} (--reseed)")
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


# --- seeding ---------------------------------------------------------------------------------------
def columns_sql(model: Any, exprs: dict[str, str]) -> tuple[str, str, list[Any]]:
    """``(columns, select list, params)`` for an ``INSERT INTO <model> (columns) SELECT <list> …``:
    ``exprs`` gives SQL per field name; every other column gets its field's default (as a parameter),
    ``now()`` for ``auto_now(_add)``, or NULL. A field added later needs no change here unless it has
    neither a default nor NULL."""
    from django.db import connection

    cols: list[str] = []
    values: list[str] = []
    params: list[Any] = []
    for field in model._meta.concrete_fields:
        if field.primary_key and field.name not in exprs:
            continue  # the sequence numbers it
        cols.append(connection.ops.quote_name(field.column))
        if field.name in exprs:
            values.append(exprs[field.name])
        elif getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
            values.append("now()")
        elif field.null and not field.has_default():
            values.append("NULL")
        elif field.has_default() or field.empty_strings_allowed:  # a CharField without a default: ""
            values.append("%s")
            params.append(field.get_db_prep_save(field.get_default(), connection))
        else:
            raise SystemExit(f"bench/scale.py: no value for {model.__name__}.{field.name}; add it to the seed")
    return ", ".join(cols), ", ".join(values), params


def insert_select(model: Any, exprs: dict[str, str], source: str) -> int:
    from django.db import connection

    # "%" is the parameter marker: the SQL's own modulo signs are doubled.
    cols, values, defaults = columns_sql(model, {k: v.replace("%", "%%") for k, v in exprs.items()})
    source = source.replace("%", "%%")
    sql = f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({cols}) SELECT {values} {source}"
    with connection.cursor() as cursor:
        cursor.execute(sql, defaults)
        return cursor.rowcount


def seed() -> dict[str, Any]:
    """Users, tasks with their runs, events, metric points and log lines, set-based. Ids are chosen
    here (after whatever the database holds) so a task's run and its rows refer to it without updates;
    the sequences are moved past them at the end."""
    from django.contrib.auth.models import User
    from django.db import connection, transaction

    from gpus.models import Run
    from tasks.models import FinetuningTask, TaskEvent, TaskLogLine, TaskMetric

    timings: dict[str, float] = {}

    def step(label: str, work: Callable[[], int]) -> None:
        started = time.monotonic()
        rows = work()
        timings[label] = time.monotonic() - started
        print(f"  {label:<12} {rows:>11,} rows  {timings[label]:7.1f} s", flush=True)

    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(max(id), 0) FROM tasks_finetuningtask")
        task_base = cursor.fetchone()[0]
        cursor.execute("SELECT coalesce(max(id), 0) FROM gpus_run")
        run_base = cursor.fetchone()[0]
    caller = User.objects.create_user("scale-caller", email="caller@example.com")
    others = User.objects.bulk_create(User(username=f"scale-user-{n:02d}") for n in range(OTHER_USERS))
    other_ids = "ARRAY[" + ",".join(str(u.pk) for u in others) + "]"
    owner = f"CASE WHEN g % 2 = 0 THEN {caller.pk} ELSE ({other_ids})[1 + (g / 2) % {OTHER_USERS}] END"
    # Oldest first, one every 5 minutes (about a year); ids grow with created_at, as they do in use.
    created = f"now() - ({TASKS} - g) * interval '5 minutes'"
    # Every user has failed (5%) and stopped (5%) tasks; the newest few wait.
    status = (f"CASE WHEN g > {TASKS} - 6 THEN 'pending' WHEN (g / 2) % 20 = 3 THEN 'failed' "
              "WHEN (g / 2) % 20 = 7 THEN 'stopped' ELSE 'completed' END")
    series = f"FROM generate_series(1, {TASKS}) AS g"
    # No FK triggers while seeding (the rows are consistent by construction): 10M deferred FK checks
    # would queue in memory until the commit.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute("SET LOCAL synchronous_commit = off")
        step("runs", lambda: insert_select(Run, {
            "id": f"{run_base} + g", "kind": "'train'", "subject_id": f"{task_base} + g", "owner": owner,
            "label": "'scale task ' || g",
            "status": f"CASE ({status}) WHEN 'completed' THEN 'succeeded' ELSE ({status}) END",
            "gpu_config": """'{"count": 1}'::jsonb""", "memory_estimate_gb": "18.5",
            "host": f"CASE WHEN g > {TASKS} - 6 THEN '' ELSE 'gpu-host-1' END",
            "exit_code": f"CASE ({status}) WHEN 'completed' THEN 0 WHEN 'failed' THEN 1 "
                         "WHEN 'stopped' THEN -15 END",
            "error": f"CASE ({status}) WHEN 'failed' THEN 'swift exited with code 1: CUDA out of memory' ELSE '' END",
            "command": """jsonb_build_array('swift', 'sft', '--model', 'Qwen/Qwen2.5-0.5B-Instruct', '--dataset',
                          'builtin:smoke_sft', '--output_dir', '/data/outputs/scale-' || g)""",
            "log_file_path": "'/data/outputs/scale-' || g || '/train.log'",
            "created_at": created,
            "queued_at": f"CASE WHEN g > {TASKS} - 6 THEN NULL ELSE {created} + interval '1 second' END",
            "started_at": f"CASE WHEN g > {TASKS} - 6 THEN NULL ELSE {created} + interval '2 seconds' END",
            "finished_at": f"CASE WHEN g > {TASKS} - 6 THEN NULL ELSE {created} + interval '1 hour' END",
        }, series))
        step("tasks", lambda: insert_select(FinetuningTask, {
            "id": f"{task_base} + g", "run": f"{run_base} + g", "owner": owner, "name": "'scale task ' || g",
            "status": status,
            "progress": f"CASE ({status}) WHEN 'completed' THEN 1.0 WHEN 'pending' THEN 0.0 ELSE 0.4 END",
            "base_model": "'Qwen/Qwen2.5-0.5B-Instruct'", "model_path": "'Qwen/Qwen2.5-0.5B-Instruct'",
            "datasets": """'["builtin:smoke_sft"]'::jsonb""",
            "training_args": """'{"num_train_epochs": 1, "learning_rate": 0.0001, "lora_rank": 8}'::jsonb""",
            "gpu_config": """'{"count": 1}'::jsonb""", "memory_estimate_gb": "18.5",
            "output_name": "'scale-' || g", "output_path": "'/data/outputs/scale-' || g",
            "log_file_path": "'/data/outputs/scale-' || g || '/train.log'", "run_dir": "'/data/outputs/scale-' || g",
            "current_step": f"CASE WHEN g > {TASKS} - 6 THEN 0 ELSE 1000 END", "max_steps": "1000",
            "epoch": "1.0", "loss": "0.5 + (g % 100) / 100.0", "learning_rate": "0.0001",
            "metrics": """jsonb_build_object('train_loss', 0.5 + (g % 100) / 100.0, 'train_runtime', 3600)""",
            "last_log_seq": f"CASE WHEN (g % 10 = 0 AND g < {TASKS}) OR g = {BIG} THEN {LOG_LINES} ELSE 0 END",
            "created_at": created,
        }, series))
        step("events", lambda: insert_select(TaskEvent, {
            "task": f"{task_base} + g",
            "kind": "(ARRAY['created', 'queued', 'started', 'completed'])[e]",
            "message": "''", "created_at": f"{created} + e * interval '1 second'",
        }, f"{series}, generate_series(1, 4) AS e"))
        step("metrics", lambda: insert_select(TaskMetric, {
            "task": f"{task_base} + t", "kind": "CASE WHEN s % 200 = 0 THEN 'eval' ELSE 'train' END",
            "step": "s", "epoch": "s / 1000.0", "loss": "0.4 + 2.0 / (1 + s / 50.0) + (s % 7) / 100.0",
            "learning_rate": "0.0001", "grad_norm": "1.0 + (s % 13) / 10.0", "token_acc": "0.7",
            "memory_gib": "12.5", "seconds_per_step": "0.8",
            "values": "jsonb_build_object('loss', 0.4 + 2.0 / (1 + s / 50.0), 'grad_norm', 1.0 + (s % 13) / 10.0)",
        }, f"FROM (SELECT {BIG} AS t, s FROM generate_series(1, {BIG_METRIC_POINTS}) AS s UNION ALL "
           f"SELECT t * 10, s FROM generate_series(1, {METRIC_TASKS}) AS t, "
           f"generate_series(1, {METRIC_POINTS}) AS s) AS m"))
    # Log lines in ten transactions of a million (ordered by task and seq, so the indexes grow at
    # their right edge).
    log_tasks = f"(SELECT t * 10 AS t FROM generate_series(1, {LOG_TASKS - 1}) AS t UNION ALL SELECT {BIG})"
    per_batch = LOG_TASKS // 10

    def log_lines() -> int:
        total = 0
        for batch in range(10):
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL session_replication_role = replica")
                    cursor.execute("SET LOCAL synchronous_commit = off")
                total += insert_select(TaskLogLine, {
                    "task": f"{task_base} + lt.t", "seq": "s",
                    "text": """'[INFO:swift] {"loss": ' || (0.4 + (s % 97) / 100.0) || ', "grad_norm": 1.25, '
                               || '"learning_rate": 0.0001, "global_step/max_steps": "' || s || '/1000"}'""",
                    "created_at": "now()",
                }, f"FROM (SELECT t FROM {log_tasks} AS x ORDER BY t OFFSET {batch * per_batch} "
                   f"LIMIT {per_batch}) AS lt, generate_series(1, {LOG_LINES}) AS s ORDER BY lt.t, s")
                print(f"    log lines: {total:,}", flush=True)
        return total

    step("log lines", log_lines)
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval(pg_get_serial_sequence('tasks_finetuningtask', 'id'), %s)", [task_base + TASKS])
        cursor.execute("SELECT setval(pg_get_serial_sequence('gpus_run', 'id'), %s)", [run_base + TASKS])
    step("vacuum", lambda: vacuum_analyze() or 0)
    return {"caller": caller.pk, "big_task": task_base + BIG, "seconds": sum(timings.values()), "timings": timings}


def vacuum_analyze() -> None:
    """Statistics for the planner and a visibility map for index-only scans (autovacuum would get there)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) tasks_finetuningtask, gpus_run, tasks_taskevent, tasks_taskmetric, "
                       "tasks_tasklogline, auth_user")


def seeded() -> dict[str, Any] | None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_scale_seed (version int, caller int, big_task int, "
                       "seconds float, seeded_at timestamptz DEFAULT now())")
        cursor.execute("SELECT caller, big_task, seconds, seeded_at FROM bench_scale_seed WHERE version = %s",
                       [SEED_VERSION])
        row = cursor.fetchone()
    return None if row is None else {"caller": row[0], "big_task": row[1], "seconds": row[2], "seeded_at": row[3]}


# --- measuring -------------------------------------------------------------------------------------
def measure(client: Any, url: str, runs: int) -> tuple[list[float], int, int, Any]:
    """Timings of ``runs`` GETs (after 3 warm-ups), the query count of one, its status and body."""
    from django.db import connection

    for _ in range(3):
        response = client.get(url)
    queries: list[str] = []

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        response = client.get(url)
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get(url)
        times.append(time.perf_counter() - started)
    return times, len(queries), response.status_code, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed requests per URL (default 50)")
    parser.add_argument("--reseed", action="store_true", help="drop the database and seed it again")
    opts = parser.parse_args()

    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("DATABASE_URL must be a PostgreSQL URL: the targets are for PostgreSQL")
    ensure_database(url, reseed=opts.reseed)
    work = Path(tempfile.mkdtemp(prefix="ftp-bench-scale-"))
    os.environ.update({
        "DATABASE_URL": url, "FINETUNE_DATA_DIR": str(work / "data"), "FINETUNE_OFFLINE": "1",
        "FINETUNE_GPU_BACKEND": "fake", "DEBUG": "0", "DJANGO_SETTINGS_MODULE": "finetune_platform.settings",
    })

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment

    started = time.monotonic()
    call_command("migrate", verbosity=0)
    print(f"migrated in {time.monotonic() - started:.1f} s")
    info = seeded()
    if info is None and User.objects.filter(username="scale-caller").exists():
        raise SystemExit("an unfinished seed is in the database: run again with --reseed")
    if info is None:
        print(f"seeding {TASKS:,} tasks, {METRIC_TASKS * METRIC_POINTS + BIG_METRIC_POINTS:,} metric points, "
              f"{LOG_TASKS * LOG_LINES:,} log lines …", flush=True)
        info = seed()
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_scale_seed (version, caller, big_task, seconds) VALUES (%s, %s, %s, %s)",
                           [SEED_VERSION, info["caller"], info["big_task"], info["seconds"]])
        print(f"seeded in {info['seconds']:.0f} s")
    else:
        print(f"reusing the seed of {info['seeded_at']:%Y-%m-%d %H:%M} "
              f"(took {info['seconds']:.0f} s; --reseed to redo)")
        vacuum_analyze()  # cheap when nothing changed; the migration may have added indexes

    setup_test_environment()  # "testserver" is an allowed host
    client = Client()
    client.force_login(User.objects.get(pk=info["caller"]))
    big = info["big_task"]
    urls: dict[str, str] = {
        "api list": "/api/finetuning/tasks/",
        "api list ?page=2000": "/api/finetuning/tasks/?page=2000",
        "api list, last page": f"/api/finetuning/tasks/?page={-(-CALLER_TASKS // 20)}",
        "api list ?status=failed, p.100": "/api/finetuning/tasks/?status=failed&page=100",
        "getTaskList": "/finetuning/getTaskList",
        "getTaskList ?page=4000": "/finetuning/getTaskList?page=4000",
        "list page": "/tasks/",
        "list page ?page=2000": "/tasks/?page=2000",
        "detail page (100k metrics)": f"/tasks/{big}/",
        "metrics api (100k task)": f"/api/finetuning/tasks/{big}/metrics/",
    }
    print(f"\n{connection.vendor}, {TASKS:,} tasks ({CALLER_TASKS:,} the caller's), "
          f"{opts.runs} timed requests each after 3 warm-ups\n")
    print(f"{'request':<31} {'p50':>8} {'p95':>8}  {'target':>7} {'p95/target':>10}  {'830da25':>8}  queries  status")
    for name, path in urls.items():
        times, queries, code, _response = measure(client, path, opts.runs)
        target, before = TARGETS[name]
        p50, p95 = statistics.median(times), pct(times, 0.95)
        verdict = "-" if target is None else "meets" if p95 <= target else "MISSES"
        was = f"{before * 1000:6.0f}ms" if before else "       -"
        goal = f"{target * 1000:5.0f}ms {p95 / target:9.2f}x" if target else f"{'-':>7} {'-':>10}"
        print(f"{name:<31} {p50 * 1000:6.1f}ms {p95 * 1000:6.1f}ms  {goal}  {was}  {queries:7d}  {code} {verdict}"
              f"  {path}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How fast the scheduler starts work: (a) "task created with free capacity" → "swift process
started", and (b) the idle gap between one task's process exiting and the next queued task's
process starting on the same GPU.

A stand-in ``swift`` (written by this script) records the wall-clock time it started and the time
it exits, then exits at once; a real ``manage.py worker`` runs the tasks on one fake GPU
(``FINETUNE_GPU_BACKEND=fake``), so everything else — service, dispatcher, reservation, django-q2
queue, worker pickup, runner — is the real path.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ftp_bench .venv/bin/python bench/dispatch.py [--runs 40]

Uses a throw-away data dir; DATABASE_URL is honoured (the issue's targets are for PostgreSQL), else SQLite.
The database is migrated and its tasks are left behind for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAND_IN = r'''#!{python}
import json, os, sys, time
started = time.time()
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "times.json")
with open(path, "w") as f:
    json.dump({{"start": started, "end": time.time()}}, f)
'''


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values: list[float], target: float) -> str:
    p50, p95 = statistics.median(values), pct(values, 0.95)
    verdict = "meets" if p95 < target else "MISSES"
    return (f"{name:<44} p50 {p50 * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  max {max(values) * 1000:7.1f} ms"
            f"  (n={len(values)}; target p95 < {target:.1f} s: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftp-bench-dispatch-"))
    swift = work / "swift"
    swift.write_text(STAND_IN.format(python=sys.executable))
    swift.chmod(0o755)
    os.environ.update({
        "FINETUNE_DATA_DIR": str(work / "data"), "FINETUNE_MODEL_ROOTS": str(work / "models"),
        "FINETUNE_OFFLINE": "1", "FINETUNE_SWIFT_BIN": str(swift), "FINETUNE_HOST": "bench-host",
        "FINETUNE_GPU_BACKEND": "fake", "FINETUNE_FAKE_GPUS": "1x80", "FINETUNE_CPU_SLOTS": "0",
        "DJANGO_SETTINGS_MODULE": "finetune_platform.settings",
    })
    (work / "models" / "tiny").mkdir(parents=True)
    (work / "models" / "tiny" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection

    from gpus.models import RUN_ACTIVE_STATUSES, Host, Reservation, Run
    from tasks import services
    from tasks.models import FinetuningTask, TaskStatus

    call_command("migrate", verbosity=0)
    # What an earlier run of the bench left waiting must not start now.
    FinetuningTask.objects.filter(status__in=["pending", "queued", "running"]).update(status="failed")
    Run.objects.filter(status__in=[*RUN_ACTIVE_STATUSES, "lost"]).update(status="failed")
    Reservation.objects.all().delete()
    user, _ = User.objects.get_or_create(username="bench-dispatch")

    def create(name: str) -> FinetuningTask:
        return services.finetuning_task_create(
            owner=user, name=name, base_model=str(work / "models" / "tiny"), datasets=["builtin:smoke_sft"],
            training_args={"model_type": "qwen2", "template": "qwen2_5", "max_steps": 1}, gpu_config={"count": 1},
        )

    def times(task_id: int) -> dict[str, float]:
        row = FinetuningTask.objects.get(pk=task_id)
        return json.loads((Path(row.output_path) / "times.json").read_text())

    def wait_done(ids: list[int], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while FinetuningTask.objects.filter(pk__in=ids).exclude(
            status__in=[TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.STOPPED]
        ).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"tasks did not finish within {timeout} s; see {work}/worker.log")
            time.sleep(0.02)
        failed = list(FinetuningTask.objects.filter(pk__in=ids, status=TaskStatus.FAILED).values_list(
            "run__error", flat=True))
        if failed:
            raise SystemExit(f"a task failed: {failed[0]}")

    log = (work / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "manage.py", "worker"], cwd=REPO, env=os.environ.copy(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not Host.objects.live().filter(name="bench-host").exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker did not come up; see {work}/worker.log")
            time.sleep(0.2)
        wait_done([create("warm-up").pk])

        # (a) created with a free GPU → process started. One at a time, so the GPU is free.
        start_delays: list[float] = []
        for i in range(opts.runs):
            created = time.time()
            task = create(f"a{i}")
            wait_done([task.pk])
            start_delays.append(times(task.pk)["start"] - created)

        # (b) a burst on one GPU: each exits at once; the gap from one exit to the next start.
        burst = [create(f"b{i}").pk for i in range(opts.runs + 1)]
        wait_done(burst, timeout=60 + 5 * opts.runs)
        spans = sorted((t["start"], t["end"]) for t in (times(pk) for pk in burst))
        gaps = [nxt[0] - cur[1] for cur, nxt in zip(spans, spans[1:], strict=False)]
        overlaps = sum(1 for g in gaps if g < 0)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)

    db = "PostgreSQL" if connection.vendor == "postgresql" else "SQLite"
    print(f"\nscheduler latency on {db}, one fake GPU, django-q2 poll "
          f"{django.conf.settings.Q_CLUSTER['poll']} s, runner poll {django.conf.settings.FINETUNE_POLL_SECONDS} s")
    print(summary("(a) created (free GPU) → process started", start_delays, 0.5))
    print(summary("(b) exit → next queued task's process start", gaps, 1.0))
    print(f"    two tasks on the GPU at once: {overlaps} (must be 0)")
    print("for comparison, peers poll every 0.2 s (django-q2 ORM), 0.5 s (Determined), 5 s (ClearML), "
          "30 s (swift_trainer_api, H2O LLM Studio)")


if __name__ == "__main__":
    main()

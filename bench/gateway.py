#!/usr/bin/env python
"""Deployments on CPU: time from "deploy" to the first answer, and the gateway's added latency.

The real stack: daphne (``finetune_platform.asgi``), a ``manage.py worker``, the real ``swift deploy``
serving the tiny random Qwen2 the test suite builds (a local model under a throw-away model root).

1. **Deploy → first answer**: ``POST /api/deployments/`` (through the API), then the first chat
   completion that succeeds through the gateway (polled every 50 ms), N times (each deployment is
   stopped before the next). Split into deploy → ``running`` (queue pickup + swift start-up +
   readiness check) and running → answer.
2. **Added latency**: with one deployment running, M requests each directly to swift
   (``127.0.0.1:<port>`` with its internal key) and through the gateway (daphne, API token),
   alternating, keep-alive on both sides: ``GET /v1/models`` (no inference: pure proxy cost),
   a 1-token chat completion, and the time to the first byte of a streamed one. p50/p95 of each,
   and the difference.

    .venv/bin/python bench/gateway.py [--deploys 3] [--requests 200] [--fake] [--settings MODULE]

``--fake`` serves the fake swift instead (tests/fixtures/fake_swift.py; no model, milliseconds),
which isolates the gateway's own cost. DATABASE_URL (e.g. PostgreSQL) is honoured, else SQLite.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MESSAGES = [{"role": "user", "content": "What color is the dog number six?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploys", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--fake", action="store_true", help="serve the fake swift (isolates the gateway)")
    parser.add_argument("--settings", default="finetune_platform.settings",
                        help="settings module (e.g. one that enables a database connection pool)")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops daphne, the worker, swift

    work = Path(tempfile.mkdtemp(prefix="ftp-bench-gw-"))
    web_port = free_port()
    low = 20000 + (os.getpid() % 2000) * 10
    os.environ.update({
        "FINETUNE_DATA_DIR": str(work / "data"), "FINETUNE_MODEL_ROOTS": str(work / "models"),
        "FINETUNE_OFFLINE": "1", "FINETUNE_CPU_SLOTS": "1", "FINETUNE_GPU_BACKEND": "none",
        "FINETUNE_QUEUE_POLL_SECONDS": "0.1", "FINETUNE_DEPLOY_PORTS": f"{low}-{low + 9}",
        "DJANGO_SETTINGS_MODULE": opts.settings, "ALLOWED_HOSTS": "testserver,127.0.0.1",
        "FINETUNE_STOP_GRACE_SECONDS": "10",
    })
    if opts.fake:
        os.environ["FINETUNE_SWIFT_BIN"] = str(REPO / "tests" / "fixtures" / "fake_swift.py")
    (work / "models").mkdir(parents=True)
    model = work / "models" / "tiny-qwen2"
    subprocess.run([str(REPO / ".venv-swift" / "bin" / "python"), str(REPO / "tasks/builtin_models/tiny_qwen2.py"),
                    str(model)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from accounts.services import api_token_create
    from deployments.models import Deployment

    call_command("migrate", verbosity=0)
    user, _ = User.objects.get_or_create(username="bench")
    _, token = api_token_create(user=user, name="bench")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    body = {"name": "bench", "model": "tiny-qwen2", "gpu_config": {"cpu": True},
            "deploy_args": {"model_type": "qwen2", "template": "qwen2_5"}}

    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    spawn([sys.executable, "manage.py", "worker"], "worker")
    spawn([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port),
           "finetune_platform.asgi:application"], "daphne")
    web = f"http://127.0.0.1:{web_port}"
    client = httpx.Client(timeout=120, trust_env=False, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.get(f"{web}/api/deployments/")
            break
        except httpx.HTTPError:
            time.sleep(0.2)

    def deploy_once() -> tuple[float, float, Deployment]:
        start = time.perf_counter()
        pk = api.post("/api/deployments/", body, format="json").json()["id"]
        running_at = None
        url = f"{web}/api/deployments/{pk}/v1/chat/completions"
        give_up = time.monotonic() + 600
        while time.monotonic() < give_up:
            status = Deployment.objects.filter(pk=pk).values_list("status", flat=True).first()
            if status == "failed":
                raise SystemExit(f"deployment failed: {Deployment.objects.get(pk=pk).error_message}")
            if status == "running":
                running_at = running_at or time.perf_counter()
                reply = client.post(url, json={"model": "bench", "messages": MESSAGES, "max_tokens": 1})
                if reply.status_code == 200:
                    return running_at - start, time.perf_counter() - start, Deployment.objects.get(pk=pk)
            time.sleep(0.05)
        raise SystemExit(f"deployment {pk} did not answer within 600 s (see {work}/worker.log)")

    def stop(deployment: Deployment) -> None:
        api.post(f"/api/deployments/{deployment.pk}/stop/")
        while Deployment.objects.get(pk=deployment.pk).status not in ("stopped", "failed"):
            time.sleep(0.1)

    results: dict[str, Any] = {}
    try:
        time.sleep(2)  # the worker announces its host and starts its cluster
        starts: list[tuple[float, float]] = []
        deployment = None
        for i in range(opts.deploys):
            to_running, to_answer, deployment = deploy_once()
            starts.append((to_running, to_answer))
            print(f"deploy {i + 1}: running after {to_running:.2f} s, first answer after {to_answer:.2f} s",
                  flush=True)
            if i < opts.deploys - 1:
                stop(deployment)
        assert deployment is not None
        direct = httpx.Client(timeout=120, trust_env=False, headers={"Authorization": f"Bearer {deployment.api_key}"})
        base_direct = f"http://127.0.0.1:{deployment.port}/v1"
        base_gateway = f"{web}/api/deployments/{deployment.pk}/v1"
        chat = {"model": "bench", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}

        def timed(http: httpx.Client, base: str, kind: str) -> float:
            start = time.perf_counter()
            if kind == "models":
                response = http.get(f"{base}/models")
            elif kind == "chat":
                response = http.post(f"{base}/chat/completions", json=chat)
            else:  # time to the first byte of a streamed answer
                with http.stream("POST", f"{base}/chat/completions", json={**chat, "stream": True}) as response:
                    chunks = response.iter_raw()
                    next(chunks)
                    elapsed = time.perf_counter() - start
                    for _ in chunks:
                        pass
                    assert response.status_code == 200
                    return elapsed
            assert response.status_code == 200, response.text
            return time.perf_counter() - start

        for kind in ("models", "chat", "stream-ttfb"):
            for _ in range(5):  # warm both paths (connections, caches)
                timed(direct, base_direct, kind)
                timed(client, base_gateway, kind)
            d: list[float] = []
            g: list[float] = []
            for _ in range(opts.requests):
                d.append(timed(direct, base_direct, kind))
                g.append(timed(client, base_gateway, kind))
            results[kind] = (d, g)
        stop(deployment)
        counted = Deployment.objects.get(pk=deployment.pk).request_count
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        from gpus.models import Run
        from gpus.process import process_matches, stop_group

        for row in Run.objects.filter(kind="deploy").exclude(pid__isnull=True):

            if process_matches(row.pid, row.process_started):
                stop_group(row.pid, grace=2)

    db = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
    what = "fake swift" if opts.fake else "real swift deploy, tiny Qwen2, transformers on CPU"
    print(f"\n{what}; {db}; {os.cpu_count()} CPUs")
    ms = 1000.0
    print(f"deploy → running:      median {statistics.median(s[0] for s in starts):.2f} s "
          f"(min {min(s[0] for s in starts):.2f}, max {max(s[0] for s in starts):.2f}) over {len(starts)} deploys")
    print(f"deploy → first answer: median {statistics.median(s[1] for s in starts):.2f} s "
          f"(min {min(s[1] for s in starts):.2f}, max {max(s[1] for s in starts):.2f})")
    print(f"\n{'request':<14}{'direct p50':>12}{'p95':>9}{'gateway p50':>14}{'p95':>9}"
          f"{'added p50':>12}{'p95':>9}  (ms)")
    for kind, (d, g) in results.items():
        d50, d95, g50, g95 = (pct(v, q) * ms for v, q in ((d, .5), (d, .95), (g, .5), (g, .95)))
        print(f"{kind:<14}{d50:>12.1f}{d95:>9.1f}{g50:>14.1f}{g95:>9.1f}{g50 - d50:>12.1f}{g95 - d95:>9.1f}")
    print(f"\n{opts.requests} requests per kind and path; the deployment counted {counted} gateway requests")


if __name__ == "__main__":
    main()

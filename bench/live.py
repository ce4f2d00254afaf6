"""Live-update benchmark: from a line written by the swift process to its arrival in a browser's socket.

It runs the real stack — daphne (``finetune_platform.asgi``), a ``manage.py worker`` and the fake
``swift`` (tests/fixtures/fake_swift.py) writing timestamped lines — and N WebSocket clients logged in
as the task's owner on ``/ws/tasks/<id>/``. Each client keeps every line it receives; the latency of
a line is its arrival time minus the time the fake swift wrote it (same host, same clock).

Scenarios, each with the Redis channel layer (``REDIS_URL``, default redis://127.0.0.1:6379/0) and the
embedded default (no Redis):

* latency with 1, 10 and 100 viewers, lines written sparsely (2.5/s: one flush per line) and
  continuously (20/s: lines share the publisher's batches);
* throughput: 50,000 lines at 10,000 lines/s and 100,000 lines as fast as the fake swift writes,
  one viewer (plus 10 with Redis); every viewer must hold every line exactly once, in order.

Usage::

    .venv/bin/python bench/live.py                      # everything (about 5 minutes)
    .venv/bin/python bench/live.py --quick              # fewer lines
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench .venv/bin/python bench/live.py

Results go to stdout and bench/results/live-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FAKE_SWIFT = REPO / "tests" / "fixtures" / "fake_swift.py"
LINE = re.compile(r"^fake line (\d+)(?: t=([0-9.]+))?$")


# --- a minimal WebSocket client (RFC 6455; enough for JSON text frames) --------------------------
class WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str, cookie: str) -> WsClient:
        reader, writer = await asyncio.open_connection(host, port, limit=2**24)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}:{port}\r\n"
            f"Cookie: {cookie}\r\n\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        status = await reader.readline()
        if b" 101 " not in status:
            raise RuntimeError(f"handshake refused: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer)

    async def receive(self) -> str | None:
        """The next text message, or None when the server closed."""
        chunks: list[bytes] = []
        while True:
            head = await self.reader.readexactly(2)
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(length)
            if opcode == 0x8:
                return None
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x1, 0x0):
                chunks.append(payload)
                if head[0] & 0x80:
                    return b"".join(chunks).decode()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
        self.writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.writer.close()


@dataclass
class Viewer:
    seqs: list[int] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    final_status: str | None = None
    reconnects: int = 0


async def watch(
    host: str,
    port: int,
    task_id: int,
    cookie: str,
    viewer: Viewer,
    expected: int,
    deadline: float,
    ready: asyncio.Event | None = None,
) -> None:
    """Follow a task like the page does: reconnect with ``after=<last seq>`` when the socket drops."""
    while time.monotonic() < deadline:
        after = viewer.seqs[-1] if viewer.seqs else 0
        try:
            client = await WsClient.connect(host, port, f"/ws/tasks/{task_id}/?after={after}", cookie)
        except (OSError, RuntimeError):
            await asyncio.sleep(0.5)
            continue
        if ready is not None:
            ready.set()
        try:
            while time.monotonic() < deadline:
                try:
                    raw = await asyncio.wait_for(client.receive(), timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    return
                if raw is None:
                    break
                now = time.time()
                message = json.loads(raw)
                for line in message.get("lines", []):
                    viewer.seqs.append(line["seq"])
                    match = LINE.match(line["text"])
                    if match:
                        viewer.numbers.append(int(match.group(1)))
                        if match.group(2):
                            viewer.latencies.append(now - float(match.group(2)))
                        viewer.first_at = viewer.first_at or now
                        viewer.last_at = now
                status = message.get("state", {}).get("status")
                if status:
                    viewer.final_status = status
                if len(viewer.numbers) >= expected and viewer.final_status in ("completed", "failed", "stopped"):
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            client.close()
        viewer.reconnects += 1
        await asyncio.sleep(0.5)


# --- the stack --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """daphne + worker processes for one channel-layer configuration."""

    def __init__(self, env: dict[str, str], workdir: Path, label: str) -> None:
        self.env = env
        self.workdir = workdir
        self.label = label
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{self.label}-{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_web(self) -> None:
        self._spawn(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "finetune_platform.asgi:application",
            ],
            "daphne",
            self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("daphne did not start")

    def start_worker(self, **knobs: str) -> None:
        self.stop_worker()
        env = {**self.env, **{f"FAKE_SWIFT_{k.upper()}": str(v) for k, v in knobs.items()}}
        self.worker = self._spawn([sys.executable, "manage.py", "worker"], "worker", env)

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker = None

    def stop(self) -> None:
        self.stop_worker()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_scenario(
    stack: Stack,
    owner: Any,
    cookie: str,
    model: Path,
    *,
    viewers: int,
    lines: int,
    rate: float,
    stamp: bool,
    timeout: float,
) -> dict[str, Any]:
    from tasks import services
    from tasks.models import FinetuningTask, TaskLogLine

    stack.start_worker(
        lines=lines, lines_rate=rate, lines_timestamp="1" if stamp else "0", startup_seconds=2, step_seconds="0.01"
    )
    task = services.finetuning_task_create(
        owner=owner,
        name=f"bench {stack.label} v{viewers} r{rate}",
        base_model=str(model),
        datasets=["builtin:smoke_sft"],
        training_args={"max_steps": 2, "model_type": "qwen2", "template": "qwen2_5"},
        gpu_config={"cpu": True},
    )
    results = [Viewer() for _ in range(viewers)]

    async def main() -> None:
        deadline = time.monotonic() + timeout
        # Connect in waves so 100 handshakes do not time out on a small machine.
        coros = []
        for i, viewer in enumerate(results):
            ready = asyncio.Event()
            coros.append(
                asyncio.create_task(watch("127.0.0.1", stack.port, task.pk, cookie, viewer, lines, deadline, ready))
            )
            if i % 20 == 19:
                await asyncio.wait_for(ready.wait(), timeout=10)
        await asyncio.gather(*coros)

    started = time.monotonic()
    asyncio.run(main())
    wall = time.monotonic() - started
    task.refresh_from_db()
    stored = list(
        TaskLogLine.objects.filter(task=task, text__startswith="fake line ").values_list("created_at", flat=True)
    )
    ingest_rate = (len(stored) - 1) / max(1e-9, (stored[-1] - stored[0]).total_seconds()) if len(stored) > 1 else 0
    complete = all(v.numbers == list(range(1, lines + 1)) for v in results)
    no_dup = all(len(v.seqs) == len(set(v.seqs)) and v.seqs == sorted(v.seqs) for v in results)
    latencies = [lat for v in results for lat in v.latencies]
    delivered = [(v.last_at - v.first_at) for v in results if v.first_at and v.last_at]
    out = {
        "layer": stack.label,
        "viewers": viewers,
        "lines": lines,
        "rate": rate or "max",
        "status": task.status,
        "all_lines_once_in_order": complete and no_dup,
        "missing": sum(lines - len(set(v.numbers)) for v in results),
        "duplicates": sum(len(v.seqs) - len(set(v.seqs)) for v in results),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "stored_lines_per_s": round(ingest_rate),
        "viewer_lines_per_s": round((lines - 1) / statistics.mean(delivered)) if delivered and lines > 1 else None,
        "reconnects": sum(v.reconnects for v in results),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(out), flush=True)
    FinetuningTask.objects.filter(pk=task.pk).delete()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viewers", default="1,10,100")
    parser.add_argument("--layers", default="redis,embedded")
    parser.add_argument("--quick", action="store_true", help="fewer lines per scenario")
    parser.add_argument("--scenarios", default="latency,throughput")
    parser.add_argument("--runner-poll", default="0.05", help="FINETUNE_POLL_SECONDS of the worker (default 0.05)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ftp-bench-live-"))
    (root / "models" / "fake-model").mkdir(parents=True)
    (root / "models" / "fake-model" / "config.json").write_text('{"model_type": "qwen2"}')
    base_env = {
        **os.environ,
        "FINETUNE_DATA_DIR": str(root / "data"),
        "FINETUNE_MODEL_ROOTS": str(root / "models"),
        "FINETUNE_SWIFT_BIN": str(FAKE_SWIFT),
        "FINETUNE_ENV_PASSTHROUGH": "FAKE_SWIFT_*",
        "FINETUNE_OFFLINE": "1",
        "FINETUNE_POLL_SECONDS": args.runner_poll,
        "FINETUNE_QUEUE_POLL_SECONDS": "0.05",
        "FINETUNE_CPU_SLOTS": "4",
        "FINETUNE_GPU_BACKEND": "none",
        "FINETUNE_HEARTBEAT_SECONDS": "1",
        "DJANGO_SETTINGS_MODULE": "finetune_platform.settings",
        "CHANNELS_PREFIX": f"ftp-bench-{os.getpid()}",
        # Every viewer is the same user: lift the per-user socket cap (FINETUNE_MAX_SOCKETS_PER_USER).
        "FINETUNE_MAX_SOCKETS_PER_USER": "100000",
    }
    if not base_env.get("DATABASE_URL"):
        base_env["DATABASE_URL"] = f"sqlite:///{root / 'data' / 'db.sqlite3'}"
    redis_url = base_env.pop("REDIS_URL", "") or "redis://127.0.0.1:6379/0"
    os.environ.clear()
    os.environ.update(base_env)
    sys.path.insert(0, str(REPO))

    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    owner = User.objects.create_user("bench", password="bench-pass-123")
    client = Client()
    client.force_login(owner)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    model = root / "models" / "fake-model"

    sparse, continuous = (16, 100) if args.quick else (40, 200)
    throughput = 20_000 if args.quick else 50_000
    results: list[dict[str, Any]] = []
    for layer in args.layers.split(","):
        env = {**base_env, **({"REDIS_URL": redis_url} if layer == "redis" else {})}
        stack = Stack(env, root, layer)
        try:
            stack.start_web()
            for viewers in [int(v) for v in args.viewers.split(",")] if "latency" in args.scenarios else []:
                results.append(
                    run_scenario(
                        stack, owner, cookie, model, viewers=viewers, lines=sparse, rate=2.5, stamp=True, timeout=90
                    )
                )
                results.append(
                    run_scenario(
                        stack, owner, cookie, model, viewers=viewers, lines=continuous, rate=20, stamp=True, timeout=90
                    )
                )
            if "throughput" not in args.scenarios:
                continue
            results.append(
                run_scenario(
                    stack, owner, cookie, model, viewers=1, lines=throughput, rate=10_000, stamp=False, timeout=180
                )
            )
            results.append(
                run_scenario(
                    stack, owner, cookie, model, viewers=1, lines=2 * throughput, rate=0, stamp=False, timeout=240
                )
            )
            if layer == "redis":
                results.append(
                    run_scenario(
                        stack, owner, cookie, model, viewers=10, lines=throughput, rate=10_000, stamp=False, timeout=180
                    )
                )
        finally:
            stack.stop()
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / f"live-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps({"runner_poll_seconds": float(args.runner_poll), "results": results}, indent=2))
    print(
        f"\n{'layer':9} {'viewers':>7} {'lines':>7} {'rate':>6} {'p50 ms':>8} {'p95 ms':>8} {'stored/s':>9} "
        f"{'viewer/s':>9}  once&ordered"
    )
    for r in results:
        print(
            f"{r['layer']:9} {r['viewers']:>7} {r['lines']:>7} {r['rate']!s:>6} {r['p50_ms']!s:>8} "
            f"{r['p95_ms']!s:>8} {r['stored_lines_per_s']:>9} {r['viewer_lines_per_s']!s:>9}  "
            f"{r['all_lines_once_in_order']}"
        )
    print(f"\nresults: {target}; logs: {root}")


if __name__ == "__main__":
    main()

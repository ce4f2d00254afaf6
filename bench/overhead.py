#!/usr/bin/env python
"""How much time the platform adds to a training run.

The same tiny ``swift sft`` run (the tiny random Qwen2 the test suite builds, 64 rows) is started
N times directly (``subprocess.run`` with exactly the argv and environment the platform builds) and
N times through the platform (API → dispatcher → django-q2 queue → worker → runner → stored
metrics, until the API reports ``completed``), alternating, and the medians are compared.

    .venv/bin/python bench/overhead.py [--runs 5] [--steps 20]

Uses a throw-away data dir; DATABASE_URL (e.g. PostgreSQL) is honoured if set, else SQLite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftp-bench-"))
    os.environ.update({
        "FINETUNE_DATA_DIR": str(work / "data"), "FINETUNE_MODEL_ROOTS": str(work / "models"),
        "FINETUNE_OFFLINE": "1", "FINETUNE_CPU_SLOTS": "1", "FINETUNE_QUEUE_POLL_SECONDS": "0.2",
        "DJANGO_SETTINGS_MODULE": "finetune_platform.settings", "ALLOWED_HOSTS": "testserver,127.0.0.1",
    })
    (work / "models").mkdir(parents=True)
    swift_python = REPO / ".venv-swift" / "bin" / "python"
    model = work / "models" / "tiny-qwen2"
    subprocess.run([str(swift_python), str(REPO / "tasks/builtin_models/tiny_qwen2.py"), str(model)], check=True)
    from make_datasets import write_datasets

    data = write_datasets(work / "datasets", rows=64)

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from accounts.services import api_token_create
    from gpus.models import Run
    from tasks import services
    from tasks.command import build_argv, build_env
    from tasks.models import FinetuningTask

    call_command("migrate", verbosity=0)
    user, _ = User.objects.get_or_create(username="bench")
    _, token = api_token_create(user=user, name="bench")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    dataset = services.dataset_create(owner=user, upload=SimpleUploadedFile(
        "sft.jsonl", data["sft_messages"].read_bytes()))
    body = {
        "name": "bench", "base_model": str(model), "datasets": [dataset.pk], "gpu_config": {"cpu": True},
        "training_args": {"model_type": "qwen2", "template": "qwen2_5", "max_steps": opts.steps,
                          "logging_steps": 1, "save_steps": opts.steps, "per_device_train_batch_size": 2,
                          "gradient_accumulation_steps": 1, "max_length": 128, "dataloader_num_workers": 0},
    }

    worker_log = (work / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "manage.py", "worker"], cwd=REPO, env=os.environ.copy(),
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)

    breakdown: list[tuple[float, float]] = []

    def through_platform() -> float:
        start = time.perf_counter()
        task_id = client.post("/api/finetuning/tasks/", body, format="json").json()["id"]
        while True:
            detail = client.get(f"/api/finetuning/tasks/{task_id}/").json()
            if detail["status"] in ("completed", "failed", "stopped"):
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        assert detail["status"] == "completed", detail["error_message"]
        points = client.get(f"/api/finetuning/tasks/{task_id}/metrics/").json()["results"]
        assert len([p for p in points if p["kind"] == "train"]) == opts.steps
        row = FinetuningTask.objects.get(pk=task_id)
        breakdown.append(((row.started_at - row.created_at).total_seconds(),
                          (row.finished_at - row.started_at).total_seconds()))
        return elapsed

    def direct(i: int) -> float:
        # Exactly what the platform would run, into a folder of its own.
        template = FinetuningTask(pk=10_000 + i, owner=user, task_type="sft", train_type="lora",
                                  model_source="local", model_path=str(model), datasets=[dataset.pk],
                                  training_args=services.validate_training_args(body["training_args"]),
                                  gpu_config={"cpu": True})
        run_dir = work / "direct" / str(i)
        run_dir.mkdir(parents=True)
        argv = build_argv(template, output_dir=run_dir / "output")
        # An unsaved run that holds no reservation: a CPU slot (no GPU visible), like the platform's.
        env = build_env(template, run=Run(pk=10_000_000 + i, kind="train", subject_id=template.pk),
                        workdir=run_dir).env
        start = time.perf_counter()
        with (run_dir / "train.log").open("wb") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env,
                                start_new_session=True).returncode
        elapsed = time.perf_counter() - start
        assert rc == 0, (run_dir / "train.log").read_text()[-2000:]
        return elapsed

    try:
        time.sleep(3)  # let the worker come up
        through_platform()  # warm-up (imports, page cache), not counted
        direct_times: list[float] = []
        platform_times: list[float] = []
        for i in range(opts.runs):
            direct_times.append(direct(i))
            platform_times.append(through_platform())
            print(f"run {i + 1}: direct {direct_times[-1]:.2f} s, platform {platform_times[-1]:.2f} s", flush=True)
    finally:
        worker.terminate()  # the cluster's main process stops its children in order
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)

    d, p = statistics.median(direct_times), statistics.median(platform_times)
    print(f"\ntiny swift sft, {opts.steps} steps, {opts.runs} runs each, alternating "
          f"({'PostgreSQL' if os.environ.get('DATABASE_URL', '').startswith('postgres') else 'SQLite'})")
    print(f"direct   median {d:.2f} s  (min {min(direct_times):.2f}, max {max(direct_times):.2f})")
    print(f"platform median {p:.2f} s  (min {min(platform_times):.2f}, max {max(platform_times):.2f})")
    print(f"  of which created→started (dispatch + queue pickup) median "
          f"{statistics.median(b[0] for b in breakdown[1:]):.3f} s, started→finished (runner) median "
          f"{statistics.median(b[1] for b in breakdown[1:]):.2f} s")
    print(f"ratio platform/direct = {p / d:.3f}  (overhead {100 * (p / d - 1):+.1f} %, {p - d:+.2f} s)")


if __name__ == "__main__":
    main()

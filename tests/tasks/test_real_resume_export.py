"""The real thing for issue 5: a real ``swift sft`` run stopped after a checkpoint, resumed through
the API by a real worker, completed with one continuous history; then a real ``swift export`` merges
its last checkpoint. The suite builds the tiny Qwen2 model itself; nothing is downloaded."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.conftest import upload, wait_for
from tests.tasks.test_real_swift import REAL_ARGS, TERMINAL, all_log_lines, create, wait_terminal

pytestmark = [pytest.mark.real_swift, pytest.mark.django_db(transaction=True), pytest.mark.timeout(900)]

# Gradient accumulation makes a step slow enough (0.2 s with 4, about 0.8 s with 16 on two cores) that the
# stop, which lands within a second of checkpoint-4, comes well before the run's end at step 12.
RESUME_ARGS = {**REAL_ARGS, "max_steps": 12, "save_steps": 4, "logging_steps": 1, "gradient_accumulation_steps": 16}


def test_a_real_run_is_stopped_resumed_and_exported(
    worker: Callable[..., Any], alice_api: APIClient, tiny_model: Path, data_files: dict[str, Path]
) -> None:
    worker()
    sft = upload(alice_api, data_files["sft_messages"])
    created = create(alice_api, name="resume me", base_model=str(tiny_model), datasets=[sft["id"]],
                     training_args=RESUME_ARGS)
    url = f"/api/finetuning/tasks/{created['id']}/"

    # Stop as soon as the first checkpoint exists.
    def checkpointed() -> dict[str, Any] | None:
        data = alice_api.get(url).json()
        assert data["status"] not in TERMINAL, (data["status"], data["error_message"])
        return data if data["last_checkpoint"] else None

    first = wait_for(checkpointed, timeout=300, interval=0.1)
    assert alice_api.post(f"{url}stop/").status_code == 200
    stopped = wait_terminal(alice_api, created["id"], timeout=60)
    assert stopped["status"] == "stopped", stopped["error_message"]
    checkpoint = Path(stopped["last_checkpoint"])
    step = int(checkpoint.name.split("-")[1])
    assert checkpoint.parent == Path(stopped["output_path"]) and step in (4, 8), first["last_checkpoint"]
    assert (checkpoint / "trainer_state.json").is_file()
    points = alice_api.get(f"{url}metrics/").json()["results"]
    logged_before = [p["step"] for p in points if p["kind"] == "train"]
    lines_before = len(all_log_lines(alice_api, created["id"]))

    # Resume through the API: the same task, run 2, back through the queue.
    started = time.monotonic()
    response = alice_api.post(f"{url}resume/", {}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["run_number"] == 2 and response.json()["resume_from"] == str(checkpoint)
    task = wait_terminal(alice_api, created["id"], timeout=400)
    resume_wall = time.monotonic() - started
    assert task["status"] == "completed", (task["error_message"], all_log_lines(alice_api, task["id"])[-20:])
    assert task["current_step"] == 12 and task["max_steps"] == 12 and task["progress"] == 100
    assert "--resume_from_checkpoint" in task["command"]

    metrics = alice_api.get(f"{url}metrics/").json()
    train = [p for p in metrics["results"] if p["kind"] == "train"]
    assert [p["step"] for p in train] == list(range(1, 13)), (logged_before, [p["step"] for p in train])
    # The learning-rate schedule went on from the checkpoint (cosine, no warm-up): it never rises,
    # which it would if the resumed run had started the schedule over.
    rates = [p["learning_rate"] for p in train]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates, rates[1:], strict=False)), rates
    assert all(isinstance(p["loss"], float) for p in train)
    lines = all_log_lines(alice_api, task["id"])
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1)) and len(lines) > lines_before
    assert any(line["text"].startswith("--- run 2: resuming from") for line in lines)

    # The new run wrote into a versioned folder under the output folder; every run's checkpoints are listed.
    last = Path(task["last_checkpoint"])
    assert last.name == "checkpoint-12" and last.parent.parent == Path(task["output_path"])
    assert last.parent.name.startswith("v0-") and (last / "adapter_model.safetensors").is_file()
    listed = [(c["step"], c["run"]) for c in task["checkpoints"]]
    assert (step, "") in listed and (12, last.parent.name) in listed
    assert all(c["size_bytes"] > 0 for c in task["checkpoints"])
    events = [e["kind"] for e in alice_api.get(f"{url}events/?page_size=1000").json()["results"]]
    assert events.count("started") == 2 and events.count("resumed") == 1
    assert events.index("stopped") < events.index("resumed") < events.index("completed")

    # Export: merge the last checkpoint's adapters into a full model on a worker.
    started = time.monotonic()
    response = alice_api.post(f"{url}export/", {}, format="json")
    assert response.status_code == 201, response.content
    export_id = response.json()["id"]

    def exported() -> dict[str, Any] | None:
        (found,) = [e for e in alice_api.get(f"{url}exports/").json() if e["id"] == export_id]
        return found if found["status"] in ("completed", "failed") else None

    export = wait_for(exported, timeout=300, interval=0.5)
    export_wall = time.monotonic() - started
    assert export["status"] == "completed", (export["error_message"], export["log"][-3000:])
    merged = Path(export["output_path"])
    assert merged == Path(f"{last}-merged")
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen2"
    assert "Successfully merged LoRA" in export["log"]
    download = alice_api.get(export["download_url"])
    assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))) as archive:
        assert archive.testzip() is None
        assert f"{merged.name}/model.safetensors" in archive.namelist()
    # Usage accounting from the real runs: two training runs and an export, each in the CPU slot it
    # was booked, for as long as it really ran (issue 12).
    usage = alice_api.get("/api/usage/").json()
    assert usage["rolling_7d"]["training_runs"] == 2 and usage["rolling_7d"]["export_runs"] == 1
    assert usage["rolling_7d"]["cpu_slot_seconds"] > 1 and usage["rolling_7d"]["gpu_seconds"] == 0
    assert usage["storage_bytes"] >= sum(p.stat().st_size for p in merged.rglob("*") if p.is_file())

    # Storage hygiene: the owner deletes the outputs; the history stays, nothing is left to resume.
    response = alice_api.delete(f"{url}outputs/")
    assert response.status_code == 200, response.content
    assert not merged.exists() and not last.exists() and not checkpoint.exists()
    assert response.json()["output_bytes"] < usage["storage_bytes"] and response.json()["outputs_deleted_at"]
    assert alice_api.get(f"{url}metrics/").json()["count"] == len(metrics["results"])
    refused = alice_api.post(f"{url}export/", {}, format="json")
    assert refused.status_code == 400 and "were deleted on" in refused.json()["checkpoint"][0]
    print(f"\nreal resume (POST resume -> completed): {resume_wall:.1f} s wall; "
          f"real export (POST export -> completed): {export_wall:.1f} s wall; stopped at checkpoint-{step}, "
          f"had logged steps {logged_before[0]}-{logged_before[-1]} before the stop")

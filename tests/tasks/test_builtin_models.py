"""The built-in tiny model: the smoke preset without configuration, building on first use at launch,
build failures as plain launch errors, and the base model of a checkpoint made available for export."""

from __future__ import annotations

import json
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

import finetune_platform.settings as platform_settings
from gpus.scheduler import dispatch as dispatch_pending
from tasks import services
from tasks.builtin_models import BuiltinModelError, builtin_model_path, ensure_builtin_model
from tasks.command import LaunchError, build_argv, build_export_argv
from tasks.models import FinetuningTask, TaskStatus
from tasks.presets import get_preset
from tests.conftest import SWIFT_PYTHON
from tests.runs import run_task

pytestmark = pytest.mark.usefixtures("cpu_host")


@pytest.fixture
def builtin_dir(tmp_path: Path, settings: Any) -> Path:
    """An empty built-in models folder: nothing is built yet."""
    settings.BUILTIN_MODELS_DIR = tmp_path / "builtin-models"
    settings.FINETUNE_SMOKE_MODEL = ""
    return settings.BUILTIN_MODELS_DIR


@pytest.fixture
def fake_builder(tmp_path: Path, settings: Any) -> Path:
    """A stand-in for swift's Python that "builds" a model in a moment and counts its runs."""
    script = tmp_path / "python"
    script.write_text(
        '#!/bin/sh\necho run >> "$(dirname "$0")/builds"\nsleep 0.3\nmkdir -p "$2"\n'
        'echo "{}" > "$2/config.json"\ntouch "$2/model.safetensors"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    settings.FINETUNE_SWIFT_PYTHON = str(script)
    return tmp_path / "builds"


def smoke_task(owner: User) -> FinetuningTask:
    task = services.finetuning_task_create_from_preset(owner=owner, preset="cpu-smoke")
    dispatch_pending()
    task.refresh_from_db()
    return task


# --- the preset ------------------------------------------------------------------------------------
def test_the_smoke_preset_uses_the_builtin_model_when_nothing_is_configured(builtin_dir: Path) -> None:
    preset = get_preset("cpu-smoke")
    assert preset.base_model == "builtin:tiny-qwen2" and not preset.unavailable_reason
    assert preset.training_args["model_type"] == "qwen2" and preset.training_args["template"] == "qwen2_5"
    assert preset.title == "Smoke test: check this installation"
    assert "tiny random model" in preset.description and "learns nothing useful" in preset.description
    assert preset.gpu_config == {}  # automatic: a GPU host has no CPU slot by default


def test_an_operator_can_still_point_the_smoke_preset_at_a_real_small_model(
    settings: Any, local_model: Path
) -> None:
    settings.FINETUNE_SMOKE_MODEL = str(local_model)
    settings.FINETUNE_SMOKE_MODEL_TYPE, settings.FINETUNE_SMOKE_TEMPLATE = "llama", "llama3"
    preset = get_preset("cpu-smoke")
    assert preset.base_model == str(local_model)
    assert preset.training_args["model_type"] == "llama" and preset.training_args["template"] == "llama3"
    assert "FINETUNE_SMOKE_MODEL" in preset.description and "random" not in preset.description


def test_a_smoke_task_from_the_preset_takes_the_cpu_slot_of_a_host_without_gpus(
    alice: User, builtin_dir: Path
) -> None:
    task = smoke_task(alice)
    assert task.status == TaskStatus.QUEUED and task.gpu_config == {}
    reservation = task.run.reservations.get()
    assert reservation.cpu_slot is not None and reservation.gpu_id is None


# --- build on first use ----------------------------------------------------------------------------
def test_the_real_builder_builds_the_tiny_model_once_on_first_use(builtin_dir: Path, settings: Any) -> None:
    settings.FINETUNE_SWIFT_PYTHON = str(SWIFT_PYTHON)
    started = time.monotonic()
    folder = ensure_builtin_model("builtin:tiny-qwen2")
    assert folder == builtin_dir / "tiny-qwen2" == builtin_model_path("tiny-qwen2")
    assert time.monotonic() - started < 120
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["hidden_size"] == 64 and config["vocab_size"] == 3000
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in builtin_dir.iterdir()) == [".tiny-qwen2.lock", "tiny-qwen2"]  # no tmp left
    settings.FINETUNE_SWIFT_PYTHON = "/nonexistent/python"  # built: the builder is not run again
    assert ensure_builtin_model("tiny-qwen2") == folder


def test_a_task_on_the_builtin_model_gets_the_built_folder_as_its_model(
    alice: User, builtin_dir: Path, fake_builder: Path
) -> None:
    task = smoke_task(alice)
    argv = build_argv(task, output_dir=Path(task.output_path))
    folder = builtin_dir / "tiny-qwen2"
    assert argv[argv.index("--model") + 1] == str(folder) and (folder / "config.json").is_file()
    assert argv[argv.index("--model_type") + 1] == "qwen2" and argv[argv.index("--template") + 1] == "qwen2_5"
    assert argv[argv.index("--check_model") + 1] == "false"  # a local folder: no hub check
    build_argv(task, output_dir=Path(task.output_path))
    assert fake_builder.read_text().count("run") == 1


def test_two_tasks_starting_together_build_the_model_once(builtin_dir: Path, fake_builder: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        folders = list(pool.map(lambda _: ensure_builtin_model("tiny-qwen2"), range(3)))
    assert folders == [builtin_dir / "tiny-qwen2"] * 3
    assert fake_builder.read_text().count("run") == 1


def test_a_failed_build_fails_the_task_with_a_plain_message(
    alice: User, builtin_dir: Path, settings: Any, fake_swift: Callable[..., None]
) -> None:
    settings.FINETUNE_SWIFT_PYTHON = sys.executable  # the platform's Python has no torch
    task = smoke_task(alice)
    assert "failed" in run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert task.error_message.startswith("Could not build the built-in model tiny-qwen2 with ")
    assert "No module named 'torch'" in task.error_message


def test_a_missing_swift_python_is_a_launch_error_naming_the_setting(
    alice: User, builtin_dir: Path, settings: Any
) -> None:
    settings.FINETUNE_SWIFT_PYTHON = "/nonexistent/python"
    task = smoke_task(alice)
    with pytest.raises(LaunchError) as caught:
        build_argv(task, output_dir=Path(task.output_path))
    assert "/nonexistent/python (FINETUNE_SWIFT_PYTHON" in str(caught.value)


def test_an_unknown_builtin_model_is_refused() -> None:
    with pytest.raises(BuiltinModelError, match="is not a built-in model"):
        ensure_builtin_model("builtin:../../etc")


# --- export -----------------------------------------------------------------------------------------
def test_exporting_a_checkpoint_of_the_builtin_model_rebuilds_a_missing_base_model(
    tmp_path: Path, builtin_dir: Path, fake_builder: Path
) -> None:
    checkpoint = tmp_path / "output" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "args.json").write_text(json.dumps({"model": str(builtin_dir / "tiny-qwen2")}))
    build_export_argv(checkpoint=checkpoint, output_dir=tmp_path / "output" / "checkpoint-20-merged")
    assert (builtin_dir / "tiny-qwen2" / "config.json").is_file()
    other = tmp_path / "other" / "checkpoint-1"
    other.mkdir(parents=True)
    (other / "args.json").write_text(json.dumps({"model": "/srv/models/elsewhere"}))
    build_export_argv(checkpoint=other, output_dir=tmp_path / "other" / "merged")
    assert fake_builder.read_text().count("run") == 1  # other models are swift's business


# --- settings ------------------------------------------------------------------------------------------
def test_swifts_python_defaults_to_the_python_next_to_the_swift_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("swift", "python"):
        (venv_bin / name).write_text("#!/bin/sh\n")
        (venv_bin / name).chmod(0o755)
    monkeypatch.setattr(platform_settings, "FINETUNE_SWIFT_BIN", str(venv_bin / "swift"))
    assert platform_settings._default_swift_python() == str(venv_bin / "python")
    monkeypatch.setattr(platform_settings, "FINETUNE_SWIFT_BIN", str(tmp_path / "missing" / "swift"))
    assert Path(platform_settings._default_swift_python()).name.startswith("python")

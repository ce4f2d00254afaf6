"""Code from the hub is not trusted by default (docs/security.md, C1; issue 11).

swift loads every hub model and dataset with ``trust_remote_code=True``, so a hub id is accepted only
when it matches the operator's globs (``FINETUNE_HUB_MODELS`` / ``FINETUNE_HUB_DATASETS``) or the user
is trusted (staff, or marked by staff). A refusal is a 400 naming the field and the setting, wherever a
hub id comes in: the task API, the seed-compatible API, resume, export and deploy of a task, and the
launch itself. Jobs get the operator's hub tokens only when ``FINETUNE_HUB_TOKENS`` is on, and run as
``FINETUNE_RUN_AS`` when it is set.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from accounts.services import account_set_hub_trusted
from core.errors import ServiceValidationError
from core.swift_cli.env import LaunchError, base_env
from deployments import services as deployment_services
from gpus import process, supervisor
from tasks import services
from tasks.command import build_argv, task_hub_refusals, validate_dataset_specs
from tasks.models import FinetuningTask, TaskStatus
from tasks.paths import (
    PathError,
    check_hub_dataset,
    check_hub_model,
    hub_dataset_allowed,
    hub_model_allowed,
    hub_repo,
    task_dir,
)
from tests.conftest import announce_host
from tests.runs import run_task

TASKS = "/api/finetuning/tasks/"


def body(**extra: Any) -> dict[str, Any]:
    return {"name": "hub", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "datasets": ["builtin:smoke_sft"],
            "gpu_config": {"cpu": True}, **extra}


def error_text(response: Any, field: str) -> str:
    value = response.json()[field]
    return " ".join(value) if isinstance(value, list) else str(value)


def hub_task(owner: User, *, base_model: str = "evil/x", datasets: list[Any] | None = None,
             status: str = TaskStatus.FAILED) -> FinetuningTask:
    """A task row as an earlier policy (or a since-revoked trust) let it in, with one LoRA checkpoint."""
    task = FinetuningTask.objects.create(
        owner=owner, name="old", base_model=base_model, model_source="hub", model_path=base_model,
        datasets=datasets if datasets is not None else ["builtin:smoke_sft"], status=status,
    )
    output = task_dir(owner.pk, task.pk) / "output"
    checkpoint = output / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "args.json").write_text(json.dumps({"model": base_model}))
    task.output_path, task.log_file_path, task.last_checkpoint = str(output), str(output.parent / "train.log"), str(
        checkpoint)
    task.save(update_fields=["output_path", "log_file_path", "last_checkpoint"])
    return task


@pytest.fixture
def host(db: None) -> Any:
    return announce_host(cpu=1)


# --- the rule -----------------------------------------------------------------------------------------
def test_the_repository_is_matched_without_a_datasets_subset_or_count() -> None:
    assert hub_repo("AI-ModelScope/alpaca-gpt4-data-zh:default#500") == "AI-ModelScope/alpaca-gpt4-data-zh"
    assert hub_repo(" Qwen/Qwen2.5-7B-Instruct ") == "Qwen/Qwen2.5-7B-Instruct"
    assert hub_dataset_allowed("AI-ModelScope/alpaca-gpt4-data-zh:default#500", trusted=False)
    assert not hub_dataset_allowed("evil/AI-ModelScope:x#5", trusted=False)


def test_globs_match_case_sensitively(settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS = ["Qwen/*"]
    assert hub_model_allowed("Qwen/Qwen2.5-7B-Instruct", trusted=False)
    assert not hub_model_allowed("qwen/Qwen2.5-7B-Instruct", trusted=False)
    assert not hub_model_allowed("QwenX/model", trusted=False)
    assert hub_model_allowed("qwen/anything", trusted=True)


def test_a_star_trusts_every_id_and_an_empty_list_none(settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS, settings.FINETUNE_HUB_DATASETS = ["*"], []
    check_hub_model("evil/x", trusted=False)
    with pytest.raises(PathError, match=r"FINETUNE_HUB_DATASETS \(none: it is empty\)"):
        check_hub_dataset("AI-ModelScope/alpaca-gpt4-data-zh", trusted=False)


def test_the_refusal_names_the_repository_the_setting_and_the_way_out(settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS = ["Qwen/*", "deepseek-ai/*"]
    with pytest.raises(PathError) as caught:
        check_hub_model("evil/x", trusted=False)
    assert str(caught.value) == (
        "Hub model 'evil/x' is not allowed on this platform: an operator allows hub models matching "
        "FINETUNE_HUB_MODELS (Qwen/*, deepseek-ai/*), or marks your account trusted."
    )


def test_the_default_lists_hold_the_well_known_publishers() -> None:
    for model in ("Qwen/Qwen2.5-7B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "meta-llama/Llama-3.1-8B"):
        assert hub_model_allowed(model, trusted=False), model
    for dataset in ("AI-ModelScope/alpaca-gpt4-data-zh#500", "swift/self-cognition#500"):
        assert hub_dataset_allowed(dataset, trusted=False), dataset
    assert not hub_model_allowed("attacker/evil", trusted=False)


# --- the task API -------------------------------------------------------------------------------------
def test_a_hub_model_outside_the_list_is_a_400_naming_the_field_and_the_setting(
    alice_api: APIClient, host: Any
) -> None:
    response = alice_api.post(TASKS, body(base_model="evil/x"), format="json")
    assert response.status_code == 400, response.content
    text = error_text(response, "base_model")
    assert "'evil/x'" in text and "FINETUNE_HUB_MODELS" in text and "trusted" in text
    assert FinetuningTask.objects.count() == 0


def test_a_hub_dataset_outside_the_list_is_a_400_naming_the_field_and_the_setting(
    alice_api: APIClient, host: Any
) -> None:
    response = alice_api.post(TASKS, body(datasets=["builtin:smoke_sft", "evil/data:sub#10"]), format="json")
    assert response.status_code == 400, response.content
    text = error_text(response, "datasets")
    assert "'evil/data'" in text and "FINETUNE_HUB_DATASETS" in text
    assert "base_model" not in response.json()
    assert FinetuningTask.objects.count() == 0


def test_a_star_lets_every_hub_id_in(alice_api: APIClient, host: Any, settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS = settings.FINETUNE_HUB_DATASETS = ["*"]
    response = alice_api.post(TASKS, body(base_model="evil/x", datasets=["evil/data#10"]), format="json")
    assert response.status_code == 201, response.content


def test_a_trusted_user_may_name_any_hub_id(alice: User, alice_api: APIClient, host: Any) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    response = alice_api.post(TASKS, body(base_model="some-lab/new-model", datasets=["some-lab/data#10"]),
                              format="json")
    assert response.status_code == 201, response.content
    row = FinetuningTask.objects.get(pk=response.json()["id"])
    assert row.model_source == "hub" and row.model_path == "some-lab/new-model"


def test_staff_may_name_any_hub_id(staff_api: APIClient, host: Any) -> None:
    response = staff_api.post(TASKS, body(base_model="some-lab/new-model", datasets=["some-lab/data"]), format="json")
    assert response.status_code == 201, response.content


def test_trust_is_per_user(alice: User, bob_api: APIClient, host: Any) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    assert bob_api.post(TASKS, body(base_model="some-lab/new-model"), format="json").status_code == 400


def test_built_in_and_local_models_are_not_hub_ids(
    alice_api: APIClient, host: Any, settings: Any, local_model: Path
) -> None:
    settings.FINETUNE_HUB_MODELS = settings.FINETUNE_HUB_DATASETS = []  # no hub at all
    for model in ("builtin:tiny-qwen2", str(local_model), local_model.name):
        response = alice_api.post(TASKS, body(base_model=model), format="json")
        assert response.status_code == 201, (model, response.content)


def test_an_empty_list_refuses_even_the_well_known_publishers(alice_api: APIClient, host: Any, settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS = []
    response = alice_api.post(TASKS, body(), format="json")
    assert response.status_code == 400
    assert "FINETUNE_HUB_MODELS (none: it is empty)" in error_text(response, "base_model")


def test_validate_dataset_specs_refuses_untrusted_hub_datasets_by_default(db: None) -> None:
    with pytest.raises(PathError, match="FINETUNE_HUB_DATASETS"):
        validate_dataset_specs(1, ["evil/data"])
    assert validate_dataset_specs(1, ["evil/data"], hub_trusted=True) == ["evil/data"]


# --- the seed-compatible API --------------------------------------------------------------------------
def test_the_seed_create_call_refuses_in_its_own_field_names(alice_api: APIClient, host: Any) -> None:
    response = alice_api.post("/finetuning/createTask", {"name": "x", "baseModel": "evil/x",
                                                         "datasetPath": "evil/data#5"}, format="json")
    assert response.status_code == 400, response.content
    errors = response.json()["errors"]
    assert "FINETUNE_HUB_MODELS" in str(errors["baseModel"])
    assert "FINETUNE_HUB_DATASETS" in str(errors["datasetPath"])
    assert FinetuningTask.objects.count() == 0


def test_the_seed_create_call_accepts_listed_hub_ids(alice_api: APIClient, host: Any) -> None:
    response = alice_api.post("/finetuning/createTask", {
        "name": "x", "baseModel": "Qwen/Qwen2.5-0.5B-Instruct", "datasetPath": "AI-ModelScope/alpaca-gpt4-data-zh#5",
        "gpuConfig": {"cpu": True}}, format="json")
    assert response.status_code in (200, 201), response.content
    assert response.json()["code"] == 0


# --- tasks let in earlier: resume, export, deploy and the launch apply today's rule -------------------
def test_a_task_let_in_earlier_cannot_be_resumed(alice: User, host: Any) -> None:
    task = hub_task(alice)
    with pytest.raises(ServiceValidationError) as caught:
        services.finetuning_task_resume(task=task)
    assert "FINETUNE_HUB_MODELS" in caught.value.errors["base_model"]
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED


def test_a_task_let_in_earlier_with_a_hub_dataset_cannot_be_resumed(alice: User, host: Any) -> None:
    task = hub_task(alice, base_model="Qwen/Qwen2.5-0.5B-Instruct", datasets=["evil/data#5"])
    with pytest.raises(ServiceValidationError) as caught:
        services.finetuning_task_resume(task=task)
    assert set(caught.value.errors) == {"datasets"}
    assert "FINETUNE_HUB_DATASETS" in caught.value.errors["datasets"]


def test_the_export_of_a_task_let_in_earlier_is_refused(alice: User, host: Any) -> None:
    task = hub_task(alice, status=TaskStatus.COMPLETED)
    with pytest.raises(ServiceValidationError) as caught:
        services.task_export_create(task=task)
    assert "FINETUNE_HUB_MODELS" in caught.value.errors["base_model"]


def test_the_export_of_a_trusted_users_task_is_queued(alice: User, host: Any) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    task = hub_task(alice, status=TaskStatus.COMPLETED)
    assert services.task_export_create(task=task).pk


def test_deploying_a_checkpoint_of_a_task_let_in_earlier_is_refused(alice: User, host: Any) -> None:
    task = hub_task(alice, status=TaskStatus.COMPLETED)
    with pytest.raises(ServiceValidationError) as caught:
        deployment_services.deployment_create(owner=alice, name="d", task=task.pk, gpu_config={"cpu": True})
    assert "FINETUNE_HUB_MODELS" in caught.value.errors["task"]
    account_set_hub_trusted(user=alice, trusted=True)
    assert deployment_services.deployment_create(owner=alice, name="d", task=task.pk, gpu_config={"cpu": True}).pk


def test_deploying_a_hub_model_directly_stays_refused(alice: User, host: Any) -> None:
    with pytest.raises(ServiceValidationError) as caught:
        deployment_services.deployment_create(owner=alice, name="d", model="Qwen/Qwen2.5-0.5B-Instruct")
    assert "only local model folders" in caught.value.errors["model"]


def test_the_launch_refuses_a_task_whose_owner_lost_the_trust(alice: User, db: None) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    task = hub_task(alice, base_model="some-lab/new-model", datasets=["some-lab/data"])
    assert task_hub_refusals(task) == {}
    account_set_hub_trusted(user=alice, trusted=False)
    assert set(task_hub_refusals(task)) == {"base_model", "datasets"}
    with pytest.raises(LaunchError, match="FINETUNE_HUB_MODELS"):
        build_argv(task, output_dir=Path(task.output_path))


def test_a_built_in_model_task_has_nothing_to_refuse(alice: User, db: None, settings: Any) -> None:
    settings.FINETUNE_HUB_MODELS = settings.FINETUNE_HUB_DATASETS = []
    task = FinetuningTask.objects.create(owner=alice, name="b", base_model="builtin:tiny-qwen2",
                                         model_source="local", model_path="/x", datasets=["builtin:smoke_sft", 3])
    assert task_hub_refusals(task) == {}


# --- the operator's hub tokens ------------------------------------------------------------------------
def test_jobs_get_no_hub_token_unless_the_operator_turns_them_on(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms_secret")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    settings.FINETUNE_HUB_TOKENS = False
    env = base_env(workdir=tmp_path)
    assert "HF_TOKEN" not in env and "MODELSCOPE_API_TOKEN" not in env
    assert env["HF_ENDPOINT"] == "https://mirror.example"  # where the hub is, not a credential
    settings.FINETUNE_HUB_TOKENS = True
    env = base_env(workdir=tmp_path)
    assert env["HF_TOKEN"] == "hf_secret" and env["MODELSCOPE_API_TOKEN"] == "ms_secret"


def test_an_operator_passing_a_token_through_explicitly_still_can(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    settings.FINETUNE_HUB_TOKENS = False
    settings.FINETUNE_ENV_PASSTHROUGH = ["HF_TOKEN"]
    assert base_env(workdir=tmp_path)["HF_TOKEN"] == "hf_secret"


# --- FINETUNE_RUN_AS ----------------------------------------------------------------------------------
JOBS = pwd.struct_passwd(("ftp-jobs", "x", 54321, 54320, "jobs", "/nonexistent", "/usr/sbin/nologin"))


@pytest.fixture
def jobs_user(monkeypatch: pytest.MonkeyPatch, settings: Any) -> pwd.struct_passwd:
    """FINETUNE_RUN_AS names a user this host knows (pwd answers for it)."""
    settings.FINETUNE_RUN_AS = "ftp-jobs"
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam", lambda name: JOBS if name == "ftp-jobs" else real(name))
    return JOBS


def test_without_run_as_a_launch_is_unchanged(tmp_path: Path, settings: Any) -> None:
    settings.FINETUNE_RUN_AS = ""
    env: dict[str, str] = {"HOME": "/root"}
    assert process.run_as_popen_kwargs(argv=["swift"], workdir=tmp_path, env=env) == {}
    assert env == {"HOME": "/root"}


def test_run_as_switches_user_and_hands_over_only_what_the_job_writes(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch, jobs_user: pwd.struct_passwd
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    changed: dict[str, tuple[int, int]] = {}
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: changed.__setitem__(os.readlink(f"/proc/self/fd/{fd}"),
                                                                             (uid, gid)))
    monkeypatch.setattr(os, "chown", lambda path, uid, gid, follow_symlinks=True: changed.__setitem__(
        str(path), (uid, gid)))
    settings.HUB_CACHE_DIR = tmp_path / "hub"
    (tmp_path / "hub" / "models").mkdir(parents=True)
    workdir = tmp_path / "task"
    (workdir / "output" / "checkpoint-3").mkdir(parents=True)
    (workdir / "output" / "checkpoint-3" / "a.bin").write_text("x")
    (workdir / "train.log").write_text("")
    env = base_env(workdir=workdir)
    kwargs = process.run_as_popen_kwargs(argv=["swift", "sft", "--output_dir", str(workdir / "output")],
                                         workdir=workdir, env=env)
    assert kwargs == {"user": 54321, "group": 54320, "extra_groups": []}
    assert env["HOME"] == str(workdir / "cache" / "home") and env["USER"] == env["LOGNAME"] == "ftp-jobs"
    owned = {Path(path) for path in changed}
    assert {workdir / "cache", workdir / "cache" / "home", workdir / "output",
            workdir / "output" / "checkpoint-3" / "a.bin", tmp_path / "hub", tmp_path / "hub" / "models"} <= owned
    # The run's own folder and its log stay the worker's: the job cannot swap the log for a link.
    assert workdir not in owned and workdir / "train.log" not in owned
    assert set(changed.values()) == {(54321, 54320)}


def test_an_export_hands_over_the_folder_its_merged_model_goes_into(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch, jobs_user: pwd.struct_passwd
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    given: list[Path] = []
    monkeypatch.setattr(process, "hand_over", lambda folder, uid, gid: given.append(folder))
    settings.HUB_CACHE_DIR = tmp_path / "hub"
    (tmp_path / "output" / "checkpoint-3").mkdir(parents=True)
    process.run_as_popen_kwargs(argv=["swift", "export", "--output_dir", str(tmp_path / "output" /
                                                                          "checkpoint-3-merged")],
                                workdir=tmp_path / "exports" / "1", env={})
    assert tmp_path / "output" in given


def test_hand_over_never_follows_a_link_or_changes_a_hard_linked_file(tmp_path: Path) -> None:
    uid, gid = 54321, 54320  # we are root in the test sandbox; skip elsewhere
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    os.link(outside, folder / "hard")
    (folder / "own.txt").write_text("x")
    process.hand_over(folder, uid, gid)
    assert (folder / "own.txt").stat().st_uid == uid
    assert os.lstat(folder / "link").st_uid == uid  # the link itself
    assert outside.stat().st_uid == 0  # neither through the symbolic nor through the hard link


def test_run_as_a_user_that_does_not_exist_is_a_plain_error(settings: Any, tmp_path: Path) -> None:
    settings.FINETUNE_RUN_AS = "no-such-user-here"
    with pytest.raises(LaunchError, match="FINETUNE_RUN_AS names the user 'no-such-user-here', which does not exist"):
        process.run_as_popen_kwargs(argv=["swift"], workdir=tmp_path, env={})


def test_a_worker_that_is_not_root_fails_the_run_naming_the_setting(
    make_task: Callable[..., FinetuningTask], fake_swift: Callable[..., None], cpu_host: Any,
    monkeypatch: pytest.MonkeyPatch, jobs_user: pwd.struct_passwd,
) -> None:
    task = make_task()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert "FINETUNE_RUN_AS" in task.error_message and "run the worker as root" in task.error_message
    assert "Traceback" not in task.error_message


def test_a_run_as_launch_starts_swift_with_that_user(
    make_task: Callable[..., FinetuningTask], fake_swift: Callable[..., None], cpu_host: Any,
    monkeypatch: pytest.MonkeyPatch, jobs_user: pwd.struct_passwd,
) -> None:
    """The supervisor passes the user to Popen (the process itself runs as root here: the test
    sandbox's folders are not readable by another user)."""
    seen: dict[str, Any] = {}
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.update({key: kwargs.pop(key) for key in ("user", "group", "extra_groups") if key in kwargs})
        seen["env"] = kwargs["env"]
        return real_popen(argv, **kwargs)

    monkeypatch.setattr(supervisor.subprocess, "Popen", popen)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(process, "hand_over", lambda folder, uid, gid: None)
    task = make_task()
    run_task(task.pk)
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, task.error_message
    assert (seen["user"], seen["group"], seen["extra_groups"]) == (54321, 54320, [])
    assert seen["env"]["USER"] == "ftp-jobs"

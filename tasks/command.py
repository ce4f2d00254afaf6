"""Build the argv and the environment a task's ``swift`` process runs with.

The argv is a list assembled from platform-chosen flags and allow-listed, validated training
arguments (:mod:`core.swift_cli.training_args`); it is executed without a shell. The environment is built
from scratch: only an allow-list of variables is inherited from the worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from django.conf import settings

from accounts.services import account_hub_trusted
from core.swift_cli.env import LaunchEnv, LaunchError, base_env
from core.swift_cli.training_args import training_args_to_argv
from gpus.models import Run
from gpus.selectors import apply_reserved_gpus
from tasks.builtin_models import (
    BUILTIN_MODELS,
    BuiltinModelError,
    ensure_builtin_model,
    is_built,
    is_builtin_model_id,
)
from tasks.models import Dataset, FinetuningTask, TaskType, TrainType
from tasks.paths import PathError, check_hub_dataset, check_hub_model, datasets_dir, is_hub_dataset_id, is_within

BUILTIN_DATASETS_DIR = Path(__file__).resolve().parent / "builtin_datasets"
BUILTIN_PREFIX = "builtin:"

_DEVICES = re.compile(r"^(\d{1,3}|GPU-[0-9a-fA-F\-]{8,64})(,(\d{1,3}|GPU-[0-9a-fA-F\-]{8,64}))*$")


def subcommand_for(task_type: str) -> list[str]:
    if task_type == TaskType.SFT:
        return ["sft"]
    if task_type == TaskType.PT:
        return ["pt"]
    return ["rlhf", "--rlhf_type", str(task_type)]


def normalize_gpu_config(raw: Any) -> dict[str, Any]:
    """Accept the seeds' spellings and return ``{"devices": "0,1"}``, ``{"count": N}``,
    ``{"cpu": True}`` or ``{}``; ``min_memory_gb`` is kept. Raises ValueError with a reason."""
    if raw in (None, ""):
        return {}
    if not isinstance(raw, dict):
        raise ValueError("must be an object such as {\"devices\": \"0,1\"}, {\"count\": 1} or {\"cpu\": true}")
    known = {"devices", "cuda_visible_devices", "gpu_id", "gpu_ids", "count", "cpu", "min_memory_gb"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    devices = raw.get("devices", raw.get("cuda_visible_devices", raw.get("gpu_id", raw.get("gpu_ids"))))
    if isinstance(devices, list):
        devices = ",".join(str(d) for d in devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        devices = str(devices)
    if devices not in (None, ""):
        if not isinstance(devices, str) or not _DEVICES.match(devices.replace(" ", "")):
            raise ValueError("devices must look like \"0\" or \"0,1\" (GPU indices or UUIDs)")
        named = devices.replace(" ", "").split(",")
        if len(named) > 64:
            raise ValueError("devices may name at most 64 GPUs")
        twice = sorted({d for d in named if named.count(d) > 1})
        if twice:  # one card cannot be given to a task twice: such a request could never start
            raise ValueError(f"devices names {', '.join(twice)} more than once")
        out["devices"] = ",".join(named)
    if "count" in raw:
        count = raw["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 64:
            raise ValueError("count must be a whole number from 1 to 64")
        if "devices" in out:
            raise ValueError("give either devices or count, not both")
        out["count"] = count
    if raw.get("cpu") not in (None, False):
        if raw["cpu"] is not True:
            raise ValueError("cpu must be true or false")
        if "devices" in out or "count" in out:
            raise ValueError("a CPU task cannot also ask for GPUs")
        out["cpu"] = True
    if raw.get("min_memory_gb") is not None:
        mem = raw["min_memory_gb"]
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not 0 < mem <= 4096:
            raise ValueError("min_memory_gb must be a number of GiB between 0 and 4096")
        out["min_memory_gb"] = mem
    return out


def task_hub_refusals(task: FinetuningTask) -> dict[str, str]:
    """Why the task's hub model or hub datasets may not be used *today* (field → message, empty when
    they may): the owner's trust or the operator's allow-lists may have changed since the task was
    created. Checked when a task starts or resumes, and by export and deploy, which load its base
    model again (from the checkpoint's args.json)."""
    refusals: dict[str, str] = {}
    hub_datasets = [spec for spec in task.datasets or [] if isinstance(spec, str) and is_hub_dataset_id(spec)]
    if task.model_source != "hub" and not hub_datasets:
        return refusals
    trusted = account_hub_trusted(user=task.owner)
    if task.model_source == "hub" and not is_builtin_model_id(task.base_model):
        try:
            check_hub_model(task.model_path or task.base_model, trusted=trusted)
        except PathError as exc:
            refusals["base_model"] = str(exc)
    for spec in hub_datasets:
        try:
            check_hub_dataset(spec, trusted=trusted)
        except PathError as exc:
            refusals["datasets"] = str(exc)
            break
    return refusals


def resolve_dataset_argument(task: FinetuningTask, spec: Any) -> str:
    """Turn one entry of ``task.datasets`` into what ``--dataset`` receives, re-checking at launch
    (a file can vanish or be swapped for a symlink after the task was created; the hub policy is
    :func:`task_hub_refusals`, checked by :func:`build_argv`)."""
    if isinstance(spec, int) or (isinstance(spec, str) and re.fullmatch(r"[0-9]+", spec)):
        dataset = Dataset.objects.filter(pk=int(spec), owner_id=task.owner_id).first()
        if dataset is None:
            raise LaunchError(f"Dataset {spec} no longer exists (it was deleted after the task was created).")
        path = Path(dataset.path)
        if not is_within(path, datasets_dir(task.owner_id)):
            raise LaunchError(f"Dataset {dataset.pk} ({dataset.name}) is not inside your workspace.")
        if not path.is_file():
            raise LaunchError(f"The file of dataset {dataset.pk} ({dataset.name}) is missing: {path}")
        return str(path.resolve())
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        path = BUILTIN_DATASETS_DIR / f"{spec[len(BUILTIN_PREFIX):]}.jsonl"
        if not is_within(path, BUILTIN_DATASETS_DIR) or not path.is_file():
            raise LaunchError(f"Built-in dataset {spec!r} does not exist.")
        return str(path.resolve())
    if isinstance(spec, str) and is_hub_dataset_id(spec):
        return spec
    raise LaunchError(f"Dataset {spec!r} is neither an uploaded dataset id nor a hub dataset id.")


def model_argument(task: FinetuningTask) -> str:
    """What ``--model`` receives: the stored hub id or folder, or for a built-in model
    (``builtin:tiny-qwen2``) its folder on this host, built now if this is its first use. The
    absolute path is what swift writes into the checkpoints' args.json, where export and deploy read it."""
    if is_builtin_model_id(task.base_model):
        try:
            return str(ensure_builtin_model(task.base_model))
        except BuiltinModelError as exc:
            raise LaunchError(str(exc)) from None
    return task.model_path


def ensure_checkpoint_base_model(checkpoint: Path) -> None:
    """Rebuild the built-in base model a checkpoint was trained on if this host lacks it (its data
    folder was cleared, or the work runs on another host): swift export and deploy load the base
    model from the path in the checkpoint's args.json. Anything else is left to swift."""
    try:
        model = json.loads((Path(checkpoint) / "args.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(model, str):
        return
    folder = Path(model)
    if folder.parent != settings.BUILTIN_MODELS_DIR or folder.name not in BUILTIN_MODELS or is_built(folder):
        return
    try:
        ensure_builtin_model(folder.name)
    except BuiltinModelError as exc:
        raise LaunchError(str(exc)) from None


def default_save_total_limit() -> int | None:
    """The ``save_total_limit`` a task that sets none is given (``FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT``);
    ``None`` when the setting is 0, which leaves swift's own default (every checkpoint is kept)."""
    return settings.FINETUNE_DEFAULT_SAVE_TOTAL_LIMIT or None


def with_default_save_total_limit(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the platform's default ``save_total_limit`` when the task sets none: a task with
    ``save_steps=1`` must not fill the shared disk (docs/operations.md, "Storage")."""
    default = default_save_total_limit()
    if default is None or args.get("save_total_limit") is not None:
        return args
    return {**args, "save_total_limit": default}


def build_argv(task: FinetuningTask, *, output_dir: Path, resume_from: Path | None = None) -> list[str]:
    """The complete argv for a task, starting with the swift executable.

    The first run writes straight into ``output_dir`` (``--add_version false``). A resumed run adds
    ``--resume_from_checkpoint`` and lets swift create a new versioned folder ``output_dir/v<N>-…``
    (``--add_version true``): the earlier run's checkpoints and ``logging.jsonl`` stay untouched,
    and the runner follows the new folder's ``logging.jsonl``.
    """
    refused = task_hub_refusals(task)
    if refused:
        raise LaunchError(" ".join(refused.values()))
    args = dict(task.training_args or {})
    datasets = [resolve_dataset_argument(task, spec) for spec in task.datasets]
    if not datasets:
        raise LaunchError("The task has no datasets.")
    argv: list[str] = [settings.FINETUNE_SWIFT_BIN, *subcommand_for(task.task_type)]
    argv += ["--model", model_argument(task)]  # after the quick checks: a built-in model may be built here
    argv += ["--dataset", *datasets]
    argv += ["--tuner_type", "full" if task.train_type == TrainType.FULL else "lora"]
    if task.train_type == TrainType.QLORA:
        compute = args.get("torch_dtype") if args.get("torch_dtype") in ("bfloat16", "float16") else "bfloat16"
        argv += ["--quant_method", "bnb", "--quant_bits", "4", "--bnb_4bit_compute_dtype", compute,
                 "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant", "true"]
    if task.train_type == TrainType.FULL:
        # LoRA-only knobs mean nothing for full training; swift would reject nothing but keep it clean.
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules"):
            args.pop(key, None)
    args = with_default_save_total_limit(args)
    argv += training_args_to_argv(args)
    if resume_from is not None:
        checkpoint = Path(resume_from)
        if not checkpoint.is_absolute() or not is_within(checkpoint, output_dir) or not checkpoint.is_dir():
            raise LaunchError(
                f"The checkpoint to resume from is missing or not inside the task's output folder: {checkpoint}"
            )
        argv += ["--output_dir", str(output_dir), "--add_version", "true",
                 "--resume_from_checkpoint", str(checkpoint.resolve())]
    else:
        argv += ["--output_dir", str(output_dir), "--add_version", "false"]
    if settings.FINETUNE_OFFLINE or task.model_source == "local":
        # check_model asks the hub whether the weights changed: pointless for a local folder and a
        # ~24 s stall when offline (see docs/ms-swift-notes.md).
        argv += ["--check_model", "false"]
    for value in argv[1:]:
        if "\x00" in value:
            raise LaunchError("An argument contains a NUL character.")
    return argv


def build_env(task: FinetuningTask, *, run: Run, workdir: Path) -> LaunchEnv:
    """The per-task environment (:func:`base_env`) plus the devices its run was given."""
    env = base_env(workdir=workdir)
    devices = apply_reserved_gpus(env, run)
    if len(devices) > 1:
        env["NPROC_PER_NODE"] = str(len(devices))
    if run.master_port:
        env["MASTER_PORT"] = str(run.master_port)
    return LaunchEnv(env=env, devices=devices)


def build_export_argv(*, checkpoint: Path, output_dir: Path) -> list[str]:
    """``swift export`` merging a LoRA checkpoint into a full model in ``output_dir``.

    Paths are absolute (swift reads the base model and template from the checkpoint's args.json,
    and writes the paths it was given into the merged folder's args.json). ``--check_model`` is a
    training argument only; export would refuse it, so offline mode is the environment's job.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not checkpoint.is_absolute() or not output_dir.is_absolute():
        raise LaunchError("export paths must be absolute")
    if not checkpoint.is_dir():
        raise LaunchError(f"The checkpoint to export is missing: {checkpoint}")
    ensure_checkpoint_base_model(checkpoint)
    argv = [settings.FINETUNE_SWIFT_BIN, "export", "--adapters", str(checkpoint), "--merge_lora", "true",
            "--output_dir", str(output_dir)]
    for value in argv[1:]:
        if "\x00" in value:
            raise LaunchError("An argument contains a NUL character.")
    return argv


def build_export_env(*, workdir: Path) -> LaunchEnv:
    """An export merges on the CPU: no GPU is reserved for it, so every GPU is hidden (a merge of a
    7B model needs about its size in RAM and takes minutes, not a training slot)."""
    env = base_env(workdir=workdir)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return LaunchEnv(env=env, devices=[])


def validate_dataset_specs(owner_id: int, specs: Any, *, hub_trusted: bool = False) -> list[Any]:
    """Check ``datasets`` at creation time; returns the normalised list or raises PathError.
    ``hub_trusted``: the owner may name any hub dataset, not only ``FINETUNE_HUB_DATASETS``."""
    if isinstance(specs, (str, int)) and not isinstance(specs, bool):
        specs = [specs]
    if not isinstance(specs, list) or not specs:
        raise PathError("give at least one dataset: an uploaded dataset id or a hub dataset id")
    if len(specs) > 32:
        raise PathError("at most 32 datasets per task")
    clean: list[Any] = []
    for spec in specs:
        if isinstance(spec, bool):
            raise PathError(f"{spec!r} is not a dataset")
        if isinstance(spec, int) or (isinstance(spec, str) and re.fullmatch(r"[0-9]+", spec.strip())):
            pk = int(spec)
            if not Dataset.objects.filter(pk=pk, owner_id=owner_id).exists():
                raise PathError(f"dataset {pk} does not exist")
            clean.append(pk)
            continue
        if not isinstance(spec, str):
            raise PathError(f"{spec!r} is not a dataset id")
        value = spec.strip()
        if value.startswith(BUILTIN_PREFIX):
            name = value[len(BUILTIN_PREFIX):]
            if not re.fullmatch(r"[a-z0-9_]+", name) or not (BUILTIN_DATASETS_DIR / f"{name}.jsonl").is_file():
                raise PathError(f"{value!r} is not a built-in dataset")
            clean.append(value)
            continue
        if value.startswith(("/", ".", "~", "-")) or "\\" in value or ".." in value:
            raise PathError(
                f"{value!r}: local files cannot be named by path; upload the file and use its dataset id"
            )
        if not is_hub_dataset_id(value):
            raise PathError(f"{value!r} is not a hub dataset id (owner/name, optionally #N for N samples)")
        check_hub_dataset(value, trusted=hub_trusted)
        clean.append(value)
    return clean

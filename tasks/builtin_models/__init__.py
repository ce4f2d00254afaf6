"""Built-in base models: ``builtin:<name>`` names a model the platform builds itself, offline, the
first time a task uses it, so that a fresh installation has something to train.

Like the built-in datasets (``builtin:smoke_sft``), the id is what the task stores; the folder is
found at launch (:func:`ensure_builtin_model`, called by :func:`tasks.command.build_argv` on the
worker's host) in ``<FINETUNE_BUILTIN_MODELS_DIR>/<name>`` (default ``<FINETUNE_DATA_DIR>/builtin-models``).
Each model has a standalone builder script next to this module, run with swift's Python
(``FINETUNE_SWIFT_PYTHON``: it needs torch and transformers, which the platform's own environment
does not have). The builders are idempotent and atomic, and a lock file keeps two tasks of one host
from building the same model at once.

The models are random: they check an installation end to end and learn nothing useful.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

BUILTIN_MODEL_PREFIX = "builtin:"
BUILDERS_DIR = Path(__file__).resolve().parent
#: Seconds a build may take (the tiny model takes about 6 s on two cores).
BUILD_TIMEOUT_SECONDS = 600
#: What the builder inherits from the worker; nothing else (it needs no credentials).
_BUILD_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "OMP_NUM_THREADS")


class BuiltinModelError(Exception):
    """A built-in model is unknown or could not be built; the message is for the user."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    script: str  # the builder, a file in this folder
    model_type: str  # what swift needs to train a local folder it cannot identify
    template: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        # 266k parameters, 1 MB, about 6 s to build on two cores.
        BuiltinModel(name="tiny-qwen2", script="tiny_qwen2.py", model_type="qwen2", template="qwen2_5"),
    )
}


def builtin_model_id(name: str) -> str:
    return f"{BUILTIN_MODEL_PREFIX}{name}"


def is_builtin_model_id(value: str) -> bool:
    """True for anything spelled ``builtin:…``, known or not (unknown ones are refused, never looked up)."""
    return value.strip().startswith(BUILTIN_MODEL_PREFIX)


def get_builtin_model(value: str) -> BuiltinModel:
    """The built-in model an id (``builtin:tiny-qwen2``) or a bare name names."""
    name = value.strip().removeprefix(BUILTIN_MODEL_PREFIX)
    model = BUILTIN_MODELS.get(name)
    if model is None:
        known = ", ".join(builtin_model_id(n) for n in BUILTIN_MODELS)
        raise BuiltinModelError(f"{value.strip()!r} is not a built-in model (built-in models: {known})")
    return model


def builtin_model_path(value: str) -> Path:
    """Where a built-in model lives on this host, built or not."""
    return settings.BUILTIN_MODELS_DIR / get_builtin_model(value).name


def is_built(folder: Path) -> bool:
    """The builders rename a finished model into place, so these two files mean a complete model."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_builtin_model(value: str) -> Path:
    """The folder of a built-in model, built first if this host does not have it yet (seconds).

    Raises :class:`BuiltinModelError` with a plain message when the model is unknown or its build fails.
    """
    model = get_builtin_model(value)
    folder = builtin_model_path(model.name)
    if is_built(folder):
        return folder
    python = settings.FINETUNE_SWIFT_PYTHON
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{model.name}.lock", "w") as lock:
            # A second task starting meanwhile waits here, then finds the model built.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if is_built(folder):
                return folder
            env = {key: os.environ[key] for key in _BUILD_ENV if key in os.environ}
            env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(settings.HUB_CACHE_DIR / "huggingface")})
            result = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [python, str(BUILDERS_DIR / model.script), str(folder)], cwd=folder.parent, env=env,
                stdin=subprocess.DEVNULL, capture_output=True, timeout=BUILD_TIMEOUT_SECONDS, check=False,
            )
    except subprocess.TimeoutExpired:
        raise BuiltinModelError(
            f"Building the built-in model {model.name} took longer than {BUILD_TIMEOUT_SECONDS} s."
        ) from None
    except OSError as exc:
        raise BuiltinModelError(
            f"Could not build the built-in model {model.name} with {python} (FINETUNE_SWIFT_PYTHON, the Python "
            f"of swift's environment): {exc.strerror or exc}"
        ) from None
    if result.returncode != 0 or not is_built(folder):
        output = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        detail = output[-1] if output else f"exit code {result.returncode}"
        raise BuiltinModelError(
            f"Could not build the built-in model {model.name} with {python} (FINETUNE_SWIFT_PYTHON, the Python "
            f"of swift's environment, needs torch and transformers): {detail}"
        )
    return folder

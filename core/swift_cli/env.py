"""The environment every ``swift`` process starts with, built from scratch: only an allow-list of
the worker's variables is inherited (plus ``FINETUNE_ENV_PASSTHROUGH``).

The operator's hub tokens (``HF_TOKEN``, ``MODELSCOPE_API_TOKEN``) are inherited only when
``FINETUNE_HUB_TOKENS`` is on: a job runs code from the hub, and what it can read it can send away
(docs/security.md, C1). Naming them in ``FINETUNE_ENV_PASSTHROUGH`` passes them anyway: that list is
the operator's explicit choice.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings


class LaunchError(Exception):
    """The process cannot be launched as configured; the message is shown to the user."""


#: Variables a swift process inherits from the worker; everything else is set explicitly.
INHERITED_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH",
    "CUDA_HOME", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "HF_ENDPOINT", "MODELSCOPE_DOMAIN", "NCCL_*",
)

#: The operator's hub credentials: inherited only when ``FINETUNE_HUB_TOKENS`` is on (gated models).
HUB_TOKEN_ENV = ("HF_TOKEN", "MODELSCOPE_API_TOKEN")


def _inherit(names: Iterable[str]) -> dict[str, str]:
    patterns = list(names) + list(settings.FINETUNE_ENV_PASSTHROUGH)
    if settings.FINETUNE_HUB_TOKENS:
        patterns += HUB_TOKEN_ENV
    return {
        key: value
        for key, value in os.environ.items()
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
    }


@dataclass(frozen=True)
class LaunchEnv:
    env: dict[str, str]
    devices: list[str]


def base_env(*, workdir: Path) -> dict[str, str]:
    """What every swift process gets, whatever it does: own temp and preprocessing caches under
    ``workdir``, the shared hub download cache, hub access off when the platform is offline."""
    cache = workdir / "cache"
    for sub in ("datasets", "mpl", "tmp", "xdg"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    hub = settings.HUB_CACHE_DIR
    env = _inherit(INHERITED_ENV)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            # Model and dataset downloads are shared between tasks (a 7B model is 15 GB);
            # preprocessing caches, temp files and matplotlib state are the task's own.
            "MODELSCOPE_CACHE": str(hub / "modelscope"),
            "HF_HOME": str(hub / "huggingface"),
            "HF_DATASETS_CACHE": str(cache / "datasets"),
            "MPLCONFIGDIR": str(cache / "mpl"),
            "TMPDIR": str(cache / "tmp"),
            "XDG_CACHE_HOME": str(cache / "xdg"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if settings.FINETUNE_OFFLINE:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HF": "1"})
    return env

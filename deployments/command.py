"""The argv and environment of a ``swift deploy`` process, and the checks behind them.

Like training (:mod:`tasks.command`), nothing a user types reaches swift unless it is a key of
:data:`DEPLOY_ARGS` whose value passed that key's check; the argv is a list run without a shell.
The platform sets the flags that matter for safety itself: ``--host`` = this host's
``FINETUNE_HOST_ADDRESS`` (127.0.0.1 by default: then the model server is never reachable from outside
the host; on a multi-host install the address the gateway reaches it on), the allocated ``--port`` and
a random ``--api_key``. The environment names an empty folder in ``SWIFT_MEDIA_ALLOWED_DIRS`` and a
host that does not exist in ``SWIFT_URL_ALLOWED_HOSTS``, so swift reads no local file and fetches no URL
named in a request, whatever reaches it (the gateway already refuses them: docs/security.md, H1).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings

from core.swift_cli.env import LaunchEnv, LaunchError, base_env
from core.swift_cli.estimate import parameters_for
from core.swift_cli.training_args import ArgSpec, TrainingArgsError, args_to_argv, validate_args
from deployments.models import Deployment, DeploymentSource, InferenceBackend
from gpus.models import Run
from gpus.selectors import apply_reserved_gpus
from tasks.command import ensure_checkpoint_base_model

#: What ``SWIFT_URL_ALLOWED_HOSTS`` names: a host in the reserved ``.invalid`` domain (RFC 2606) never
#: resolves, so swift refuses every media URL before any connection.
NO_MEDIA_HOST = "no-media.invalid"


def bind_address() -> str:
    """Where this host's model servers listen (and the readiness probe calls): ``FINETUNE_HOST_ADDRESS``.
    The worker records the same value on its ``Host`` row; the gateway proxies to it."""
    return settings.FINETUNE_HOST_ADDRESS.strip() or "127.0.0.1"


def http_host(address: str) -> str:
    """``address`` as the host part of a URL (an IPv6 address in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _spec(kind: str, **kwargs: Any) -> ArgSpec:
    return ArgSpec(kind=kind, **kwargs)


#: The deploy arguments a user may set (swift 4.6 ``DeployArguments``).
DEPLOY_ARGS: dict[str, ArgSpec] = {
    "model_type": _spec("name", max_length=100, help="swift model type, for a local folder swift cannot identify."),
    "template": _spec("name", max_length=100, help="Chat template, for a local folder swift cannot identify."),
    "system": _spec("text", max_length=4000, file_suffix=".txt", help="Default system prompt."),
    "torch_dtype": _spec("choice", choices=("bfloat16", "float16", "float32"), help="Weights dtype."),
    "max_length": _spec("int", minimum=16, maximum=1_048_576, unit="tokens", help="Longest prompt + answer."),
    "max_new_tokens": _spec("int", minimum=1, maximum=1_048_576, unit="tokens",
                            help="Default answer length when a request gives none."),
    "temperature": _spec("float", minimum=0.0, maximum=10.0, help="Default sampling temperature."),
    "top_k": _spec("int", minimum=0, maximum=100_000, help="Default top-k."),
    "top_p": _spec("float", minimum=0.0, maximum=1.0, help="Default top-p."),
    "repetition_penalty": _spec("float", minimum=0.0, maximum=10.0, help="Default repetition penalty."),
    "max_batch_size": _spec("int", minimum=1, maximum=4096, help="transformers backend: requests batched together."),
    "log_interval": _spec("int", minimum=0, maximum=86_400, unit="s", help="Seconds between throughput lines."),
    "vllm_gpu_memory_utilization": _spec("float", minimum=0.05, maximum=0.99,
                                         help="vLLM: share of GPU memory it takes."),
    "vllm_max_model_len": _spec("int", minimum=16, maximum=1_048_576, unit="tokens", help="vLLM: context length."),
    "vllm_max_num_seqs": _spec("int", minimum=1, maximum=65_536, help="vLLM: concurrent sequences."),
    "vllm_enforce_eager": _spec("bool", help="vLLM: no CUDA graphs (less memory, slower)."),
    "vllm_max_lora_rank": _spec("int", minimum=1, maximum=1024, help="vLLM: the largest LoRA rank served."),
    "vllm_tensor_parallel_size": _spec("int", minimum=1, maximum=64, help="vLLM: GPUs per model (default: all)."),
    "sglang_tp_size": _spec("int", minimum=1, maximum=64, help="SGLang: GPUs per model (default: all)."),
    "sglang_mem_fraction_static": _spec("float", minimum=0.05, maximum=0.99, help="SGLang: static memory share."),
    "sglang_context_length": _spec("int", minimum=16, maximum=1_048_576, unit="tokens",
                                   help="SGLang: context length."),
    "lmdeploy_tp": _spec("int", minimum=1, maximum=64, help="LMDeploy: GPUs per model (default: all)."),
    "lmdeploy_session_len": _spec("int", minimum=16, maximum=1_048_576, unit="tokens",
                                  help="LMDeploy: session length."),
    "lmdeploy_cache_max_entry_count": _spec("float", minimum=0.05, maximum=0.99,
                                            help="LMDeploy: share of GPU memory for the KV cache."),
}

#: Flags the platform sets; naming one is an error that says why.
RESERVED_DEPLOY_ARGS: dict[str, str] = {
    "host": "the model server listens on the host's FINETUNE_HOST_ADDRESS; reach it through the gateway",
    "port": "the port is allocated by the platform",
    "api_key": "the platform sets a random key; call the gateway with your API token",
    "model": "choose what to serve with task/checkpoint or model",
    "adapters": "choose what to serve with task/checkpoint",
    "infer_backend": "set it with the backend field",
    "served_model_name": "set it with the served_model_name field",
    "verbose": "request contents are never written to the log",
    "ssl_keyfile": "the gateway terminates the connection",
    "ssl_certfile": "the gateway terminates the connection",
}

#: Tensor-parallel flag per backend, set to the number of reserved GPUs unless the user set it.
_TP_FLAG = {
    InferenceBackend.VLLM: "vllm_tensor_parallel_size",
    InferenceBackend.SGLANG: "sglang_tp_size",
    InferenceBackend.LMDEPLOY: "lmdeploy_tp",
}
_BACKEND_PACKAGES = {InferenceBackend.VLLM: "vllm", InferenceBackend.SGLANG: "sglang",
                     InferenceBackend.LMDEPLOY: "lmdeploy"}
_SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}$")


def validate_deploy_args(raw: Any) -> dict[str, Any]:
    """Validate user deploy arguments; raises :class:`TrainingArgsError` (key → reason)."""
    return validate_args(raw, catalogue=DEPLOY_ARGS, reserved=RESERVED_DEPLOY_ARGS, field="deploy_args",
                         kind="deploy")


def deploy_args_to_argv(args: Mapping[str, Any]) -> list[str]:
    try:
        return args_to_argv(args, DEPLOY_ARGS)
    except TrainingArgsError as exc:
        raise LaunchError(f"deploy argument {', '.join(exc.errors)} must not start with '-'") from None


def deploy_args_catalogue() -> list[dict[str, Any]]:
    return [{"name": key, "type": spec.kind, "minimum": spec.minimum, "maximum": spec.maximum,
             "choices": list(spec.choices), "unit": spec.unit, "help": spec.help}
            for key, spec in DEPLOY_ARGS.items()]


def check_served_model_name(value: str) -> str:
    value = (value or "").strip()
    if not _SERVED_NAME.match(value):
        raise ValueError("use 1-100 letters, digits, '_', '.', ':' or '-', starting with a letter or digit")
    return value


def default_served_model_name(name: str, pk: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.\-]+", "-", name.strip()).strip("-._").lower()[:80]
    return slug or f"deployment-{pk}"


# --- backends ---------------------------------------------------------------------------------------
def _swift_site_packages() -> list[Path]:
    """The site-packages of the interpreter that runs swift (read from the script's shebang)."""
    try:
        with open(settings.FINETUNE_SWIFT_BIN, "rb") as handle:
            first = handle.readline(512).decode("utf-8", errors="replace").strip()
    except OSError:
        return []
    if not first.startswith("#!"):
        return []
    interpreter = Path(first[2:].split()[0])
    if interpreter.name == "env":
        return []
    prefix = interpreter.parent.parent
    return sorted(prefix.glob("lib/python3*/site-packages"))


@functools.lru_cache(maxsize=8)
def _installed_backends(swift_bin: str) -> tuple[str, ...]:
    found = []
    roots = _swift_site_packages()
    for backend, package in _BACKEND_PACKAGES.items():
        if any((root / package).is_dir() for root in roots):
            found.append(str(backend))
    return tuple(found)


def available_backends() -> list[str]:
    """``transformers`` always; vLLM, SGLang, LMDeploy when installed next to swift (or when the
    operator lists them in ``FINETUNE_DEPLOY_BACKENDS``)."""
    extra = settings.FINETUNE_DEPLOY_BACKENDS or list(_installed_backends(settings.FINETUNE_SWIFT_BIN))
    return [InferenceBackend.TRANSFORMERS.value] + [
        b for b in (InferenceBackend.VLLM, InferenceBackend.SGLANG, InferenceBackend.LMDEPLOY) if b.value in extra
    ]


# --- memory -----------------------------------------------------------------------------------------
def estimate_inference_memory_gb(*, model_source: str, model_path: str, base_model: str) -> float | None:
    """GiB per GPU to serve a model: 16-bit weights plus ~20 % and a fixed 2 GiB for the KV cache,
    activations and the CUDA context. None when the size is unknown (then any GPU will do)."""
    params = parameters_for(model_source, model_path, base_model)
    if params is None:
        return None
    return round(2.0 * params / 1e9 * 1.2 + 2.0, 1)


# --- argv and environment ---------------------------------------------------------------------------
def build_argv(deployment: Deployment, *, port: int, api_key: str, gpu_count: int) -> list[str]:
    """The complete argv, starting with the swift executable. Re-checks the source folder."""
    path = Path(deployment.model_path)
    if not path.is_dir():
        raise LaunchError(f"The folder to serve no longer exists: {path}")
    argv = [settings.FINETUNE_SWIFT_BIN, "deploy"]
    if deployment.source == DeploymentSource.CHECKPOINT and (path / "adapter_config.json").is_file():
        ensure_checkpoint_base_model(path)  # swift loads the base model named in the checkpoint's args.json
        argv += ["--adapters", str(path)]
    else:
        argv += ["--model", str(path)]
    args = dict(deployment.deploy_args or {})
    flag = _TP_FLAG.get(deployment.backend)
    if flag and gpu_count > 1 and flag not in args:
        args[flag] = gpu_count
    argv += [
        "--infer_backend", deployment.backend,
        "--host", bind_address(), "--port", str(port), "--api_key", api_key,
        "--served_model_name", deployment.served_model_name,
        # swift logs every request and answer by default; chats stay out of the log.
        "--verbose", "false",
    ]
    argv += deploy_args_to_argv(args)
    if any("\x00" in value for value in argv):
        raise LaunchError("An argument contains a NUL character.")
    return argv


def redact(argv: list[str], secret: str) -> list[str]:
    return [("***" if value == secret else value) for value in argv]


def no_media_dir(workdir: Path) -> Path:
    """The deployment's empty folder, ``<workdir>/no-media``: the only place swift may read media from.
    Created read-only; a folder that is not empty (someone put files there) is refused."""
    folder = workdir / "no-media"
    if not folder.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)  # nothing the model server runs can put a file there
    if folder.is_symlink() or any(folder.iterdir()):
        raise LaunchError(f"{folder} must be an empty folder (swift may read media only from there).")
    return folder


def build_env(run: Run, *, workdir: Path) -> LaunchEnv:
    """The deployment's environment: the one every swift process gets (own caches, hub access off
    when offline) and the GPUs the scheduler reserved for its run (none for a CPU slot).

    swift reads a local path or fetches a URL named in a chat request's media; a deployment's callers
    are not trusted with the host's files or network (docs/security.md, H1), so media may come only
    from an empty folder and from a host that does not exist. Training is different: its datasets
    legitimately name media files anywhere, so :mod:`tasks.command` sets neither."""
    env = base_env(workdir=workdir)
    env.pop("SWIFT_ALLOW_INTERNAL_URL", None)  # never from FINETUNE_ENV_PASSTHROUGH
    env["SWIFT_MEDIA_ALLOWED_DIRS"] = str(no_media_dir(workdir))
    env["SWIFT_URL_ALLOWED_HOSTS"] = NO_MEDIA_HOST
    env["SWIFT_MAX_DOWNLOAD_SIZE_MB"] = "1"
    devices = apply_reserved_gpus(env, run)
    return LaunchEnv(env=env, devices=devices)


def checkpoint_args(path: Path) -> dict[str, Any]:
    """The training arguments swift saved next to a checkpoint (empty if unreadable)."""
    try:
        data = json.loads((path / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

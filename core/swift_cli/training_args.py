"""The allow-list of training arguments a user may set, with types and ranges.

Nothing a user types reaches ``swift`` unless it is a key listed here and its value passes the
key's check. Values are rendered into argv by :func:`training_args_to_argv` as separate list
elements (there is no shell anywhere), and no value may start with ``-`` so it can never be read
as a flag. Seed spellings (``max_seq_length``, ``lora_r``) are accepted and normalised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class TrainingArgsError(ValueError):
    """A bad training argument; ``errors`` maps each offending key to a plain-English reason."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in errors.items()))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ArgSpec:
    """One allowed argument: its type, bounds, and the swift flag it becomes."""

    kind: str  # "int" | "float" | "bool" | "choice" | "text" | "name" | "names"
    flag: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int = 200
    help: str = ""
    default: Any = None  # shown to users (the value swift uses when the key is absent)
    unit: str = ""
    group: str = "advanced"
    aliases: tuple[str, ...] = field(default=())
    #: swift reads a value ending in this suffix as the path of a file to open (``system``: ``.txt``);
    #: such a value is refused, or a user could have a file of the worker copied into their log.
    #: Compared without case and surrounding blanks, a little wider than swift's own test. Every
    #: allow-listed argument swift may open is listed in docs/security.md ("Arguments that read files").
    file_suffix: str = ""


def _spec(kind: str, **kwargs: Any) -> ArgSpec:
    return ArgSpec(kind=kind, **kwargs)


INT32 = 2**31 - 1

#: The allowed training arguments. ``group`` "common" ones are shown up front in the form.
TRAINING_ARGS: dict[str, ArgSpec] = {
    "num_train_epochs": _spec("float", minimum=0.01, maximum=1000, default=3, group="common",
                              help="Passes over the training data."),
    "max_steps": _spec("int", minimum=1, maximum=10_000_000, default=None, group="common",
                       help="Stop after this many optimizer steps (overrides epochs)."),
    "per_device_train_batch_size": _spec("int", minimum=1, maximum=4096, default=1, group="common",
                                         help="Samples per device per step."),
    "per_device_eval_batch_size": _spec("int", minimum=1, maximum=4096, default=1,
                                        help="Samples per device per evaluation step."),
    "gradient_accumulation_steps": _spec("int", minimum=1, maximum=4096, default=None, group="common",
                                         help="Steps to accumulate before an optimizer update "
                                              "(swift picks 16 / batch size when unset)."),
    "learning_rate": _spec("float", minimum=1e-10, maximum=1.0, default=1e-4, group="common",
                           help="Peak learning rate."),
    "warmup_ratio": _spec("float", minimum=0.0, maximum=1.0, default=0.0, help="Share of steps spent warming up."),
    "warmup_steps": _spec("int", minimum=0, maximum=10_000_000, default=0, help="Warm-up steps (overrides ratio)."),
    "weight_decay": _spec("float", minimum=0.0, maximum=10.0, default=0.1, help="AdamW weight decay."),
    "logging_steps": _spec("int", minimum=1, maximum=1_000_000, default=5, unit="steps",
                           help="Record loss and learning rate every N steps."),
    "save_steps": _spec("int", minimum=1, maximum=1_000_000, default=500, unit="steps",
                        help="Save a checkpoint every N steps."),
    "eval_steps": _spec("int", minimum=1, maximum=1_000_000, default=None, unit="steps",
                        help="Evaluate every N steps (needs split_dataset_ratio or an eval set)."),
    "save_total_limit": _spec("int", minimum=1, maximum=1000, default=None,
                              help="Keep at most N checkpoints (oldest are deleted)."),
    "split_dataset_ratio": _spec("float", minimum=0.0, maximum=0.5, default=0.0,
                                 help="Share of the data held out for evaluation."),
    "max_length": _spec("int", minimum=16, maximum=1_048_576, default=None, group="common", unit="tokens",
                        aliases=("max_seq_length",), help="Longest sample in tokens; longer ones are truncated."),
    "lora_rank": _spec("int", minimum=1, maximum=4096, default=8, group="common", aliases=("lora_r",),
                       help="LoRA rank (r)."),
    "lora_alpha": _spec("float", minimum=0.01, maximum=65536, default=32, help="LoRA alpha."),
    "lora_dropout": _spec("float", minimum=0.0, maximum=0.99, default=0.05, help="LoRA dropout."),
    "target_modules": _spec("names", default="all-linear",
                            help="Modules LoRA adapts: all-linear, or names such as q_proj v_proj."),
    "gradient_checkpointing": _spec("bool", default=True, help="Trade compute for memory."),
    "torch_dtype": _spec("choice", choices=("bfloat16", "float16", "float32"), default=None,
                         help="Weights' dtype (swift picks one from the model when unset)."),
    "system": _spec("text", max_length=4000, default=None, file_suffix=".txt", help="Default system prompt."),
    "model_author": _spec("text", max_length=200, default=None, help="Author name for self-cognition data."),
    "model_name": _spec("text", max_length=200, default=None, help="Model name for self-cognition data."),
    "dataloader_num_workers": _spec("int", minimum=0, maximum=64, default=1, help="Data-loading processes."),
    "seed": _spec("int", minimum=0, maximum=INT32, default=42, help="Random seed."),
    "model_type": _spec("name", max_length=100, default=None,
                        help="swift model type of a local model folder (e.g. qwen2)."),
    "template": _spec("name", max_length=100, default=None,
                      help="Chat template of a local model folder (e.g. qwen2_5)."),
    "beta": _spec("float", minimum=0.0, maximum=100.0, default=None, help="Preference-training beta."),
    "rpo_alpha": _spec("float", minimum=0.0, maximum=100.0, default=None, help="DPO: weight of the SFT loss."),
    "deepspeed": _spec("choice", choices=("zero2", "zero3"), default=None,
                       help="DeepSpeed ZeRO stage for multi-GPU training."),
}

#: Arguments the platform sets itself; a user naming one gets a clear error, not a silent override.
RESERVED_ARGS: dict[str, str] = {
    "output_dir": "the output directory is chosen by the server; use output_name for a label",
    "model": "set the base model with the base_model field",
    "dataset": "set datasets with the datasets field",
    "tuner_type": "set it with the train_type field",
    "train_type": "set it with the train_type field",
    "rlhf_type": "set it with the task_type field",
    "resume_from_checkpoint": "resume a stopped task instead",
    "add_version": "the platform manages output folders",
    "check_model": "the platform sets it from FINETUNE_OFFLINE",
}

_ALIASES = {alias: key for key, spec in TRAINING_ARGS.items() for alias in spec.aliases}


def _check_number(key: str, spec: ArgSpec, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError("must not start with '-'")
        try:
            number: float = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    else:
        number = value
    try:
        finite = math.isfinite(number)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"must be at most {spec.maximum:g}") from None
    if not finite:
        raise ValueError("must be a finite number")
    if spec.kind == "int":
        if number != int(number):
            raise ValueError(f"must be a whole number, not {value!r}")
        number = int(number)
    if spec.minimum is not None and number < spec.minimum:
        raise ValueError(f"must be at least {spec.minimum:g}")
    if spec.maximum is not None and number > spec.maximum:
        raise ValueError(f"must be at most {spec.maximum:g}")
    if number == 0:
        number = type(number)(0)  # -0.0 would render as "-0.0", which looks like a flag
    return number


def _check_text(spec: ArgSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    if value.startswith("-"):
        raise ValueError("must not start with '-' (it would be read as a flag)")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if len(value) > spec.max_length:
        raise ValueError(f"must be at most {spec.max_length} characters")
    if spec.kind == "name" and not _NAME.match(value):
        raise ValueError("may contain only letters, digits, '_', '.', and '-'")
    if spec.file_suffix and value.strip().lower().endswith(spec.file_suffix.lower()):
        raise ValueError(f"must not end in '{spec.file_suffix}': swift would open it as the path of a file; "
                         "write the text itself")
    return value


def _check_value(key: str, spec: ArgSpec, value: Any) -> Any:
    if spec.kind in ("int", "float"):
        return _check_number(key, spec, value)
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("must be true or false")
    if spec.kind == "choice":
        if value not in spec.choices:
            raise ValueError(f"must be one of: {', '.join(spec.choices)}")
        return value
    if spec.kind in ("text", "name"):
        return _check_text(spec, value)
    if spec.kind == "names":
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError("must be a name or a non-empty list of names")
        if len(items) > 64:
            raise ValueError("at most 64 names")
        return [_check_text(ArgSpec(kind="name", max_length=100), item) for item in items]
    raise AssertionError(f"unknown spec kind {spec.kind}")


def validate_args(
    raw: Any, *, catalogue: Mapping[str, ArgSpec], reserved: Mapping[str, str], field: str,
    kind: str = "training", aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate user arguments against an allow-list (``catalogue``); raises
    :class:`TrainingArgsError` mapping each bad key to the reason. ``reserved`` flags are the
    platform's own (naming one says why); ``None`` values are dropped."""
    if raw in (None, ""):
        return {}
    if not isinstance(raw, Mapping):
        raise TrainingArgsError({field: "must be an object of argument names to values"})
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for raw_key, value in raw.items():
        key = str(raw_key)
        name = key.lstrip("-")
        if key != name:
            errors[key] = f"write argument names without dashes (use {name!r})"
            continue
        if name in reserved:
            errors[key] = f"cannot be set: {reserved[name]}"
            continue
        canonical = (aliases or {}).get(name, name)
        spec = catalogue.get(canonical)
        if spec is None:
            errors[key] = f"is not an allowed {kind} argument"
            continue
        if value is None:
            continue
        if canonical in clean:
            errors[key] = f"given twice (also as {canonical!r})"
            continue
        try:
            clean[canonical] = _check_value(canonical, spec, value)
        except ValueError as exc:
            errors[key] = str(exc)
    if errors:
        raise TrainingArgsError(errors)
    return clean


def validate_training_args(raw: Any) -> dict[str, Any]:
    """Validate and normalise user training arguments; raises :class:`TrainingArgsError`."""
    return validate_args(raw, catalogue=TRAINING_ARGS, reserved=RESERVED_ARGS, field="training_args",
                         aliases=_ALIASES)


def _render(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, float):
        return [repr(value)]
    return [str(value)]


def args_to_argv(args: Mapping[str, Any], catalogue: Mapping[str, ArgSpec]) -> list[str]:
    """Render validated arguments as ``--flag value`` pairs, in allow-list order."""
    argv: list[str] = []
    for key, spec in catalogue.items():
        if key not in args:
            continue
        values = _render(args[key])
        # Defence in depth: validation already refused these; never let one through.
        if any(v.startswith("-") or "\x00" in v for v in values):
            raise TrainingArgsError({key: "must not start with '-'"})
        argv.append(f"--{spec.flag or key}")
        argv.extend(values)
    return argv


def training_args_to_argv(args: Mapping[str, Any]) -> list[str]:
    return args_to_argv(args, TRAINING_ARGS)


def training_args_catalogue() -> list[dict[str, Any]]:
    """The allow-list as data, for forms and ``GET /api/finetuning/training-args/``."""
    return [
        {
            "name": key,
            "type": spec.kind,
            "minimum": spec.minimum,
            "maximum": spec.maximum,
            "choices": list(spec.choices),
            "default": spec.default,
            "unit": spec.unit,
            "group": spec.group,
            "aliases": list(spec.aliases),
            "help": spec.help,
        }
        for key, spec in TRAINING_ARGS.items()
    ]

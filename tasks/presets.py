"""Presets: a complete task in one name, so creating one needs only the preset (plus an optional
GPU choice and output name).

``qwen2.5-7b-lora`` is the seed's fixed LLM configuration (seeds/000, "LLM训练固定配置"), value
for value. ``cpu-smoke`` checks an installation end to end in under a minute with no configuration
and no internet: a 20-step LoRA SFT of the built-in tiny random model (``builtin:tiny-qwen2``, built
into the data folder on first use) on the built-in 64-row dataset. An operator may point it at a real
small local model with ``FINETUNE_SMOKE_MODEL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from tasks.builtin_models import BUILTIN_MODELS, builtin_model_id


class PresetError(LookupError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str
    task_type: str
    train_type: str
    base_model: str
    datasets: tuple[Any, ...]
    training_args: dict[str, Any] = field(default_factory=dict)
    gpu_config: dict[str, Any] = field(default_factory=dict)
    unavailable_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "description": self.description,
            "task_type": self.task_type, "train_type": self.train_type, "base_model": self.base_model,
            "datasets": list(self.datasets), "training_args": dict(self.training_args),
            "gpu_config": dict(self.gpu_config), "available": not self.unavailable_reason,
            "unavailable_reason": self.unavailable_reason,
        }


SEED_LLM_PRESET = Preset(
    name="qwen2.5-7b-lora",
    title="Qwen2.5-7B-Instruct LoRA (seed's fixed LLM preset)",
    description="LoRA SFT of Qwen/Qwen2.5-7B-Instruct on alpaca-gpt4 zh/en and self-cognition, 500 samples "
                "each, with the fixed parameters of the original system. Needs one GPU with about 20 GiB.",
    task_type="sft",
    train_type="lora",
    base_model="Qwen/Qwen2.5-7B-Instruct",
    datasets=(
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "AI-ModelScope/alpaca-gpt4-data-en#500",
        "swift/self-cognition#500",
    ),
    training_args={
        "torch_dtype": "bfloat16",
        "num_train_epochs": 1,
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1,
        "learning_rate": 1e-4,
        "lora_rank": 8,
        "lora_alpha": 32,
        "target_modules": ["all-linear"],
        "gradient_accumulation_steps": 16,
        "eval_steps": 50,
        "save_steps": 50,
        "save_total_limit": 2,
        "logging_steps": 5,
        "max_length": 2048,
        "system": "You are a helpful assistant.",
        "warmup_ratio": 0.05,
        "dataloader_num_workers": 4,
        "model_author": "swift",
        "model_name": "swift-robot",
    },
)


SMOKE_TITLE = "Smoke test: check this installation"
SMOKE_DESCRIPTION_BUILTIN = (
    "Checks that this installation trains end to end: a 20-step LoRA SFT of a tiny random model the platform "
    "builds on first use, on a built-in 64-row dataset. The model learns nothing useful. Runs on one GPU where "
    "the platform has GPUs, else on a CPU slot."
)
SMOKE_DESCRIPTION_CONFIGURED = (
    "Checks that this installation trains end to end: a 20-step LoRA SFT of the small local model the operator "
    "configured (FINETUNE_SMOKE_MODEL), on a built-in 64-row dataset. Runs on one GPU where the platform has "
    "GPUs, else on a CPU slot."
)


def _smoke_preset() -> Preset:
    configured = settings.FINETUNE_SMOKE_MODEL
    builtin = BUILTIN_MODELS["tiny-qwen2"]
    return Preset(
        name="cpu-smoke",  # the name predates GPU hosts running it; kept for API clients
        title=SMOKE_TITLE,
        description=SMOKE_DESCRIPTION_CONFIGURED if configured else SMOKE_DESCRIPTION_BUILTIN,
        task_type="sft",
        train_type="lora",
        base_model=configured or builtin_model_id(builtin.name),
        datasets=("builtin:smoke_sft",),
        training_args={
            "model_type": settings.FINETUNE_SMOKE_MODEL_TYPE if configured else builtin.model_type,
            "template": settings.FINETUNE_SMOKE_TEMPLATE if configured else builtin.template,
            "max_steps": 20,
            "logging_steps": 1,
            "save_steps": 10,
            "save_total_limit": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 256,
            "dataloader_num_workers": 0,
            "learning_rate": 1e-4,
        },
        # Automatic: a GPU host offers no CPU slot unless configured to (gpus.services.default_cpu_slots),
        # so {"cpu": true} could never run on a GPU-only platform; the tiny model fits any GPU.
        gpu_config={},
    )


def all_presets() -> list[Preset]:
    return [SEED_LLM_PRESET, _smoke_preset()]


def get_preset(name: str) -> Preset:
    for preset in all_presets():
        if preset.name == name:
            if preset.unavailable_reason:
                raise PresetError(f"preset {name!r} is not available: {preset.unavailable_reason}")
            return preset
    names = ", ".join(p.name for p in all_presets())
    raise PresetError(f"unknown preset {name!r} (available: {names})")

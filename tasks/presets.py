"""Presets: a complete task in one name, so creating one needs only the preset (plus an optional
GPU choice and output name).

``qwen2.5-7b-lora`` is the seed's fixed LLM configuration (seeds/000, "LLM训练固定配置"), value
for value. ``cpu-smoke`` is a tiny CPU run an operator points at a small local model with
``FINETUNE_SMOKE_MODEL`` to check an installation end to end in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings


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


def _smoke_preset() -> Preset:
    model = settings.FINETUNE_SMOKE_MODEL
    return Preset(
        name="cpu-smoke",
        title="CPU smoke test (tiny local model)",
        description="A 20-step LoRA SFT on a built-in 64-row dataset, on a CPU slot. Checks that the "
                    "installation runs swift end to end; point FINETUNE_SMOKE_MODEL at a small local model.",
        task_type="sft",
        train_type="lora",
        base_model=model,
        datasets=("builtin:smoke_sft",),
        training_args={
            "model_type": settings.FINETUNE_SMOKE_MODEL_TYPE,
            "template": settings.FINETUNE_SMOKE_TEMPLATE,
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
        gpu_config={"cpu": True},
        unavailable_reason="" if model else "no smoke model configured: set FINETUNE_SMOKE_MODEL to a model "
                                           "folder inside FINETUNE_MODEL_ROOTS",
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

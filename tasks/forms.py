"""Forms of the portal's pages. They only collect input; validation that matters lives in the
services, whose :class:`~core.errors.ServiceValidationError` is mapped back onto the
fields here (:func:`apply_service_errors`) so each message shows next to its input."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.utils.translation import gettext, gettext_noop
from django.utils.translation import gettext_lazy as _

from core.forms import place_service_errors
from core.swift_cli.training_args import TRAINING_ARGS, ArgSpec
from tasks.builtin_models import BUILTIN_MODELS, builtin_model_id
from tasks.models import TaskType, TrainType
from tasks.paths import local_model_choices
from tasks.presets import Preset

# The allow-list's and presets' English texts (core/swift_cli/training_args.py and tasks/presets.py stay
# plain strings), marked here so that makemessages extracts them; pages show gettext(text).
# tests/web/test_pages.py checks that every help text of the allow-list is listed.
TRANSLATABLE_TEXTS = (
    gettext_noop("Passes over the training data."),
    gettext_noop("Stop after this many optimizer steps (overrides epochs)."),
    gettext_noop("Samples per device per step."),
    gettext_noop("Samples per device per evaluation step."),
    gettext_noop("Steps to accumulate before an optimizer update (swift picks 16 / batch size when unset)."),
    gettext_noop("Peak learning rate."),
    gettext_noop("Share of steps spent warming up."),
    gettext_noop("Warm-up steps (overrides ratio)."),
    gettext_noop("AdamW weight decay."),
    gettext_noop("Record loss and learning rate every N steps."),
    gettext_noop("Save a checkpoint every N steps."),
    gettext_noop("Evaluate every N steps (needs split_dataset_ratio or an eval set)."),
    gettext_noop("Keep at most N checkpoints (oldest are deleted)."),
    gettext_noop("Share of the data held out for evaluation."),
    gettext_noop("Longest sample in tokens; longer ones are truncated."),
    gettext_noop("LoRA rank (r)."),
    gettext_noop("LoRA alpha."),
    gettext_noop("LoRA dropout."),
    gettext_noop("Modules LoRA adapts: all-linear, or names such as q_proj v_proj."),
    gettext_noop("Trade compute for memory."),
    gettext_noop("Weights' dtype (swift picks one from the model when unset)."),
    gettext_noop("Default system prompt."),
    gettext_noop("Author name for self-cognition data."),
    gettext_noop("Model name for self-cognition data."),
    gettext_noop("Data-loading processes."),
    gettext_noop("Random seed."),
    gettext_noop("swift model type of a local model folder (e.g. qwen2)."),
    gettext_noop("Chat template of a local model folder (e.g. qwen2_5)."),
    gettext_noop("Preference-training beta."),
    gettext_noop("DPO: weight of the SFT loss."),
    gettext_noop("DeepSpeed ZeRO stage for multi-GPU training."),
    gettext_noop("Qwen2.5-7B-Instruct LoRA (seed's fixed LLM preset)"),
    gettext_noop(
        "LoRA SFT of Qwen/Qwen2.5-7B-Instruct on alpaca-gpt4 zh/en and self-cognition, 500 samples each, with "
        "the fixed parameters of the original system. Needs one GPU with about 20 GiB."
    ),
    gettext_noop("Smoke test: check this installation"),
    gettext_noop(
        "Checks that this installation trains end to end: a 20-step LoRA SFT of a tiny random model the platform "
        "builds on first use, on a built-in 64-row dataset. The model learns nothing useful. Runs on one GPU where "
        "the platform has GPUs, else on a CPU slot."
    ),
    gettext_noop(
        "Checks that this installation trains end to end: a 20-step LoRA SFT of the small local model the operator "
        "configured (FINETUNE_SMOKE_MODEL), on a built-in 64-row dataset. Runs on one GPU where the platform has "
        "GPUs, else on a CPU slot."
    ),
)

GPU_MODES = [
    ("auto", _("Automatic")),
    ("count", _("Any free GPUs")),
    ("devices", _("Specific GPUs")),
    ("cpu", _("CPU slot (no GPU)")),
]

ARG_PREFIX = "arg_"


class GpuRequestForm(forms.Form):
    """The GPU request: automatic (``{}``: one GPU where the platform has GPUs, else a CPU slot, as
    :meth:`gpus.placement.Request.resolved` decides), a number of GPUs, specific devices, or a CPU slot.
    Automatic is the default, so a form posted as it is runs on any platform."""

    gpu_mode = forms.ChoiceField(
        label=_("Run on"), choices=GPU_MODES, initial="auto", widget=forms.RadioSelect,
        help_text=_("Automatic: one GPU where this platform has GPUs, else a CPU slot."),
    )
    gpu_count = forms.IntegerField(label=_("Number of GPUs"), min_value=1, max_value=64, initial=1, required=False)
    gpu_devices = forms.CharField(
        label=_("GPU devices"),
        required=False,
        max_length=200,
        help_text=_("GPU indices or UUIDs separated by commas, e.g. 0,1"),
        widget=forms.TextInput(attrs={"placeholder": "0,1"}),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        mode = data.get("gpu_mode")
        if mode == "devices" and not (data.get("gpu_devices") or "").strip():
            self.add_error("gpu_devices", _("Name the GPUs to use, e.g. 0 or 0,1."))
        return data

    def gpu_config(self) -> dict[str, Any]:
        mode = self.cleaned_data.get("gpu_mode")
        if mode == "cpu":
            return {"cpu": True}
        if mode == "devices":
            return {"devices": (self.cleaned_data.get("gpu_devices") or "").strip()}
        if mode == "count":
            return {"count": self.cleaned_data.get("gpu_count") or 1}
        return {}

    def gpu_error_field(self) -> str:
        mode = self.cleaned_data.get("gpu_mode")
        return {"devices": "gpu_devices", "count": "gpu_count"}.get(mode or "", "gpu_mode")

    @staticmethod
    def initial_for(gpu_config: dict[str, Any]) -> dict[str, Any]:
        if gpu_config.get("cpu"):
            return {"gpu_mode": "cpu"}
        if gpu_config.get("devices"):
            return {"gpu_mode": "devices", "gpu_devices": gpu_config["devices"]}
        if gpu_config.get("count"):
            return {"gpu_mode": "count", "gpu_count": gpu_config["count"]}
        return {"gpu_mode": "auto"}


class PresetTaskForm(GpuRequestForm):
    """One click from a preset: only the GPU choice and an output name (a label) are asked."""

    preset = forms.CharField(widget=forms.HiddenInput)
    output_name = forms.CharField(
        label=_("Output name"),
        max_length=200,
        required=False,
        help_text=_("A label for the trained model, e.g. llm_test."),
    )
    name = forms.CharField(
        label=_("Task name"), max_length=200, required=False, help_text=_("Optional; the preset's title by default.")
    )


def _arg_field(key: str, spec: ArgSpec) -> forms.Field:
    """A form field for one allowed training argument; values stay text and the service checks them."""
    help_parts = [gettext(spec.help)] if spec.help else []
    if spec.unit:
        help_parts.append(gettext("Unit: %(unit)s.") % {"unit": gettext(spec.unit)})
    if spec.default is not None:
        default = ("true" if spec.default else "false") if isinstance(spec.default, bool) else spec.default
        help_parts.append(gettext("Default: %(default)s.") % {"default": default})
    options: dict[str, Any] = {"label": key, "required": False, "help_text": " ".join(help_parts)}
    placeholder = "" if spec.default is None else str(spec.default)
    if spec.kind in ("int", "float"):
        attrs: dict[str, Any] = {"step": "1" if spec.kind == "int" else "any", "placeholder": placeholder}
        if spec.minimum is not None:
            attrs["min"] = f"{spec.minimum:g}"
        if spec.maximum is not None:
            attrs["max"] = f"{spec.maximum:g}"
        return forms.CharField(widget=forms.NumberInput(attrs=attrs), **options)
    if spec.kind == "bool":
        choices = [("", gettext("default")), ("true", gettext("yes")), ("false", gettext("no"))]
        return forms.ChoiceField(choices=choices, **options)
    if spec.kind == "choice":
        return forms.ChoiceField(choices=[("", gettext("default"))] + [(c, c) for c in spec.choices], **options)
    if spec.kind == "text" and spec.max_length > 200:
        return forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=spec.max_length, **options)
    return forms.CharField(
        max_length=spec.max_length * (8 if spec.kind == "names" else 1),
        widget=forms.TextInput(attrs={"placeholder": placeholder}),
        **options,
    )


class TaskForm(GpuRequestForm):
    """A task from scratch: model, datasets, the common parameters, and the folded advanced ones."""

    name = forms.CharField(label=_("Task name"), max_length=200)
    description = forms.CharField(label=_("Description"), required=False, widget=forms.Textarea(attrs={"rows": 2}))
    task_type = forms.ChoiceField(label=_("Task type"), choices=TaskType.choices, initial=TaskType.SFT)
    train_type = forms.ChoiceField(label=_("Train type"), choices=TrainType.choices, initial=TrainType.LORA)
    base_model = forms.CharField(
        label=_("Base model"),
        max_length=1000,
        help_text=_("A hub id such as Qwen/Qwen2.5-7B-Instruct, a registered local model, or builtin:tiny-qwen2 "
                    "(a tiny random model that checks the installation)."),
        widget=forms.TextInput(attrs={"list": "local-models", "autocomplete": "off"}),
    )
    datasets = forms.MultipleChoiceField(label=_("Your datasets"), required=False, widget=forms.CheckboxSelectMultiple)
    hub_datasets = forms.CharField(
        label=_("Hub datasets"),
        required=False,
        help_text=_("One per line, with an optional sample count: AI-ModelScope/alpaca-gpt4-data-en#500"),
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "AI-ModelScope/alpaca-gpt4-data-en#500"}),
    )
    priority = forms.IntegerField(
        label=_("Priority"), min_value=0, max_value=10, initial=5, help_text=_("0-10; larger runs first.")
    )
    output_name = forms.CharField(
        label=_("Output name"),
        max_length=200,
        required=False,
        help_text=_("A label for the trained model; the folder is chosen by the server."),
    )
    auto_export = forms.BooleanField(
        label=_("Export when completed"),
        required=False,
        help_text=_("LoRA/QLoRA: merge the last checkpoint into a full model when training completes."),
    )

    def __init__(self, *args: Any, datasets: list[Any] = (), **kwargs: Any) -> None:  # type: ignore[assignment]
        super().__init__(*args, **kwargs)
        cap = settings.FINETUNE_USER_MAX_PRIORITY
        self.fields["priority"].initial = min(5, cap)
        if cap < 10:
            self.fields["priority"].help_text = gettext("0-10; larger runs first. Above %(cap)s is for staff.") % {
                "cap": cap}
        self.fields["datasets"].choices = [
            (str(ds.pk), f"{ds.name} — {ds.get_format_display()}, {ds.rows} " + gettext("rows")) for ds in datasets
        ]
        for key, spec in TRAINING_ARGS.items():
            self.fields[ARG_PREFIX + key] = _arg_field(key, spec)
        self.builtin_models = [builtin_model_id(name) for name in BUILTIN_MODELS]
        self.local_models = local_model_choices()

    def common_arg_fields(self) -> list[forms.BoundField]:
        return [self[ARG_PREFIX + k] for k, s in TRAINING_ARGS.items() if s.group == "common"]

    def advanced_arg_fields(self) -> list[forms.BoundField]:
        return [self[ARG_PREFIX + k] for k, s in TRAINING_ARGS.items() if s.group != "common"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if not data.get("datasets") and not (data.get("hub_datasets") or "").strip():
            self.add_error("datasets", _("Choose at least one of your datasets or name a hub dataset."))
        return data

    def dataset_specs(self) -> list[Any]:
        specs: list[Any] = [int(pk) for pk in self.cleaned_data.get("datasets") or []]
        specs += [line.strip() for line in (self.cleaned_data.get("hub_datasets") or "").splitlines() if line.strip()]
        return specs

    def training_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for key in TRAINING_ARGS:
            value = self.cleaned_data.get(ARG_PREFIX + key)
            if value not in (None, ""):
                args[key] = value.strip() if isinstance(value, str) else value
        return args

    def service_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "name": data["name"],
            "description": data.get("description") or "",
            "task_type": data["task_type"],
            "train_type": data["train_type"],
            "base_model": data["base_model"],
            "datasets": self.dataset_specs(),
            "training_args": self.training_args(),
            "gpu_config": self.gpu_config(),
            "priority": data["priority"],
            "output_name": data.get("output_name") or "",
            "auto_export": bool(data.get("auto_export")),
        }

    @classmethod
    def initial_from_preset(cls, preset: Preset) -> dict[str, Any]:
        """Pre-fill the from-scratch form with a preset's values (to adjust them)."""
        initial: dict[str, Any] = {
            "name": preset.title,
            "description": preset.description,
            "task_type": preset.task_type,
            "train_type": preset.train_type,
            "base_model": preset.base_model,
            "datasets": [str(d) for d in preset.datasets if isinstance(d, int)],
            "hub_datasets": "\n".join(str(d) for d in preset.datasets if not isinstance(d, int)),
            **cls.initial_for(dict(preset.gpu_config)),
        }
        for key, value in preset.training_args.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = " ".join(str(v) for v in value)
            initial[ARG_PREFIX + key] = value
        return initial


class DatasetUploadForm(forms.Form):
    file = forms.FileField(label=_("File"), help_text=_(".jsonl, .json or .csv; checked row by row on upload."))
    name = forms.CharField(
        label=_("Name"), max_length=200, required=False, help_text=_("Optional; the file name by default.")
    )
    description = forms.CharField(label=_("Description"), required=False, widget=forms.Textarea(attrs={"rows": 2}))


def apply_service_errors(form: forms.Form, errors: dict[str, Any]) -> None:
    """Put each message of a ServiceValidationError next to its input: training arguments by key,
    the GPU request next to the input it came from."""
    field_for = {"gpu_config": form.gpu_error_field()} if isinstance(form, GpuRequestForm) else {}
    place_service_errors(form, errors, nested={"training_args": ARG_PREFIX}, field_for=field_for)

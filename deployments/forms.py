"""The new-deployment form. It only collects input; the service validates (its errors are put back
next to the inputs with :func:`tasks.forms.apply_service_errors`)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from tasks.forms import GpuRequestForm

SOURCES = [("task", _("A checkpoint of one of my tasks")), ("model", _("A local model"))]


class DeploymentForm(GpuRequestForm):
    name = forms.CharField(label=_("Name"), max_length=200)
    source = forms.ChoiceField(label=_("Serve"), choices=SOURCES, initial="task", widget=forms.RadioSelect)
    task = forms.ChoiceField(label=_("Task"), required=False, choices=())
    checkpoint = forms.CharField(label=_("Checkpoint"), required=False, max_length=1000,
                                 help_text=_("e.g. checkpoint-100; the task's last checkpoint when empty."))
    merged = forms.BooleanField(label=_("Serve the merged model"), required=False,
                                help_text=_("Needs the checkpoint exported with its LoRA merged."))
    model = forms.CharField(label=_("Local model"), required=False, max_length=1000,
                            help_text=_("A model folder inside an allowed model root."))
    backend = forms.ChoiceField(label=_("Inference backend"), choices=())
    served_model_name = forms.CharField(label=_("Served model name"), required=False, max_length=100,
                                        help_text=_("The model name clients send; made from the name when empty."))

    def __init__(self, *args: Any, tasks: list[Any] = (), backends: list[str] = (),  # type: ignore[assignment]
                 models: list[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["task"].choices = [("", "—")] + [
            (str(t.pk), f"#{t.pk} {t.name}") for t in tasks
        ]
        self.fields["backend"].choices = [(b, b) for b in backends]
        self.model_choices = list(models)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("source") == "task" and not data.get("task"):
            self.add_error("task", _("Choose a task."))
        if data.get("source") == "model" and not (data.get("model") or "").strip():
            self.add_error("model", _("Name a local model folder."))
        return data

    def service_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        kwargs: dict[str, Any] = {"name": data["name"], "backend": data["backend"], "gpu_config": self.gpu_config(),
                                  "served_model_name": data.get("served_model_name") or ""}
        if data["source"] == "task":
            kwargs.update(task=int(data["task"]), checkpoint=data.get("checkpoint") or "",
                          merged=bool(data.get("merged")))
        else:
            kwargs["model"] = data["model"].strip()
        return kwargs

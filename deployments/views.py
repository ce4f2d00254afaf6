"""The deployment pages: list (with the new-deployment form) and detail (status, endpoint, a client
snippet, the live log, stop, and a chat playground). Thin: reads go through the selectors (another
user's deployment is a 404), changes through the services. The live parts follow the socket
``/ws/deployments/<id>/`` (``deployments.consumers``: state and log lines, no polling); the playground posts to
:func:`playground_chat`, which streams from the model through the same checks and proxy as the gateway."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import SESSION_KEY, get_user_model
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods, require_POST

from core.errors import ServiceValidationError
from deployments import gateway, selectors, services
from deployments.command import available_backends
from deployments.forms import DeploymentForm
from deployments.models import DeploymentStatus
from tasks.forms import apply_service_errors
from tasks.paths import local_model_choices

PAGE_SIZE = 20


def _labels() -> dict[str, Any]:
    return {
        "status": {value: str(label) for value, label in DeploymentStatus.choices},
        "you": _("You"),
        "model": _("Model"),
        "thinking": _("…"),
        "notRunning": _("The deployment is not running."),
        "failed": _("The request failed"),
        "copied": _("Copied"),
    }


def _form(request: HttpRequest, data: Any = None) -> DeploymentForm:
    return DeploymentForm(
        data, tasks=list(selectors.deployable_tasks(user=request.user)[:200]), backends=available_backends(),
        models=local_model_choices(), initial={"source": "task"},
    )


@login_required
@require_http_methods(["GET", "POST"])
def deployment_list(request: HttpRequest) -> HttpResponse:
    """The user's deployments, and the form to start a new one."""
    form = _form(request, request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            deployment = services.deployment_create(owner=request.user, **form.service_kwargs())
        except ServiceValidationError as exc:
            apply_service_errors(form, exc.errors)
        else:
            messages.success(request, _("Deployment “%(name)s” created; it starts as soon as its GPU or CPU slot "
                                        "is free.") % {"name": deployment.name})
            return redirect("deployment_detail", pk=deployment.pk)
    page = Paginator(selectors.deployment_list(user=request.user), PAGE_SIZE).get_page(request.GET.get("page"))
    context = {"page": page, "deployments": list(page.object_list), "form": form,
               "form_open": request.method == "POST" or request.GET.get("new") == "1",
               "labels": _labels()}
    return render(request, "deployments/deployment_list.html", context,
                  status=400 if request.method == "POST" else 200)


@login_required
def deployment_detail(request: HttpRequest, pk: int) -> HttpResponse:
    deployment = selectors.deployment_get(user=request.user, pk=pk)
    endpoint = request.build_absolute_uri(f"/api/deployments/{deployment.pk}/v1")
    context = {"deployment": deployment, "endpoint": endpoint, "labels": _labels(),
               "tail_after": max(0, deployment.last_log_seq - 2000)}
    return render(request, "deployments/deployment_detail.html", context)


@login_required
@require_POST
def deployment_stop(request: HttpRequest, pk: int) -> HttpResponse:
    deployment = services.deployment_stop(deployment=selectors.deployment_get(user=request.user, pk=pk))
    messages.success(request, _("Deployment “%(name)s” is stopping.") % {"name": deployment.name})
    return redirect("deployment_detail", pk=deployment.pk)


@login_required
@require_POST
def deployment_delete(request: HttpRequest, pk: int) -> HttpResponse:
    deployment = selectors.deployment_get(user=request.user, pk=pk)
    services.deployment_delete(deployment=deployment)
    messages.success(request, _("Deployment “%(name)s” was deleted.") % {"name": deployment.name})
    return redirect("deployments")


def _still_logged_in(session_key: str | None, user_id: int) -> bool:
    """The playground's re-check during a stream: the user is active and the session still theirs
    (read afresh: logging out or being logged out elsewhere ends it)."""
    if not get_user_model().objects.filter(pk=user_id, is_active=True).exists():
        return False
    if session_key is None:
        return True
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return str(store.get(SESSION_KEY)) == str(user_id)


async def playground_chat(request: HttpRequest, pk: int) -> HttpResponse:
    """The detail page's chat: the logged-in owner (session + CSRF token) streams from the model
    through the same checks and proxy as the token gateway (the same request allow-list, size caps,
    per-user limit and re-checks during a stream). Answers in the OpenAI shape, like the gateway."""
    if request.method != "POST":
        return gateway.openai_error(405, "Use POST.")
    refused = gateway.declared_too_large(request)
    if refused is not None:
        return refused
    user = await request.auser()
    if not user.is_authenticated:
        return gateway.openai_error(401, _("Log in to use the playground."), code="not_logged_in")
    deployment = await selectors.deployment_find(user=user, pk=pk)
    if deployment is None:
        return gateway.openai_error(404, _("This deployment does not exist."), code="deployment_not_found")
    payload = gateway.parse_chat_body(request, deployment)
    if isinstance(payload, HttpResponse):
        return payload
    check = sync_to_async(_still_logged_in)
    session_key, user_id = request.session.session_key, user.pk

    async def still_allowed() -> bool:
        return await check(session_key, user_id)

    return await gateway.proxy(deployment, endpoint="chat/completions", payload=payload, user_id=user_id,
                               still_allowed=still_allowed)

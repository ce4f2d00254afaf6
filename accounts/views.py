from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods, require_POST

from accounts.forms import SignupForm
from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke


class ApiTokenForm(forms.Form):
    name = forms.CharField(label=gettext_lazy("Token name"), max_length=100,
                           help_text=gettext_lazy("Say where it is used, e.g. “laptop notebook” or “eval script”."))


#: Session key holding a just-created token until the profile page has shown it (once).
NEW_TOKEN_KEY = "accounts.new_token"


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("home")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, _("Welcome, %(name)s! Your account is ready.") % {"name": user.username})
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})


@login_required
@require_http_methods(["GET", "POST"])
def profile(request: HttpRequest) -> HttpResponse:
    """The user's profile: API tokens (create with a name — shown once —, list, revoke)."""
    form = ApiTokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        token, raw = api_token_create(user=request.user, name=form.cleaned_data["name"])
        # Post/redirect/get: the raw token rides in the session to the next page view, which
        # shows it and forgets it; only its hash is stored.
        request.session[NEW_TOKEN_KEY] = {"id": token.pk, "name": token.name, "token": raw}
        return redirect("profile")
    new_token = request.session.pop(NEW_TOKEN_KEY, None)
    tokens = ApiToken.objects.filter(user=request.user)
    context = {"form": form, "new_token": new_token, "tokens": tokens}
    return render(request, "accounts/profile.html", context, status=400 if request.method == "POST" else 200)


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    # Tokens are personal even for staff: another user's token is a 404 here.
    token = ApiToken.objects.filter(user=request.user, pk=pk).first()
    if token is None:
        raise Http404("No such token.")
    api_token_revoke(token=token)
    messages.success(request, _("Token “%(name)s” was revoked; programs using it get 401 now.") % {"name": token.name})
    return redirect("profile")

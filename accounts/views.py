from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core import signing
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods, require_POST

from accounts.forms import SignupForm
from accounts.models import ApiToken
from accounts.security import signup_open
from accounts.services import api_token_create, api_token_revoke


class ApiTokenForm(forms.Form):
    name = forms.CharField(label=gettext_lazy("Token name"), max_length=100,
                           help_text=gettext_lazy("Say where it is used, e.g. “laptop notebook” or “eval script”."))


#: Cookie holding a just-created token from the POST to the profile page that shows it (once).
NEW_TOKEN_COOKIE = "ftp_new_token"
NEW_TOKEN_SALT = "accounts.new_token"
#: Seconds the cookie lives if the redirect is never followed.
NEW_TOKEN_MAX_AGE = 60


def signup(request: HttpRequest) -> HttpResponse:
    if not signup_open():
        # FINETUNE_SIGNUP=closed: operators create accounts in the admin.
        return render(request, "registration/signup_closed.html", status=404)
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
    path = reverse("profile")
    if request.method == "POST" and form.is_valid():
        token, raw = api_token_create(user=request.user, name=form.cleaned_data["name"])
        # Post/redirect/get: the raw token rides to the page that shows it in a signed cookie that
        # only this page receives, lives a minute and is deleted when shown. It is never written to
        # the database (a session would keep it until the next profile view, maybe for ever).
        response = redirect("profile")
        payload = {"id": token.pk, "name": token.name, "token": raw, "user": request.user.pk}
        response.set_cookie(
            NEW_TOKEN_COOKIE, signing.dumps(payload, salt=NEW_TOKEN_SALT), max_age=NEW_TOKEN_MAX_AGE, path=path,
            httponly=True, samesite="Strict", secure=settings.SESSION_COOKIE_SECURE,
        )
        return response
    new_token = _new_token_from_cookie(request)
    tokens = ApiToken.objects.filter(user=request.user)
    context = {"form": form, "new_token": new_token, "tokens": tokens}
    response = render(request, "accounts/profile.html", context, status=400 if request.method == "POST" else 200)
    if NEW_TOKEN_COOKIE in request.COOKIES:
        response.delete_cookie(NEW_TOKEN_COOKIE, path=path, samesite="Strict")
    if new_token:
        add_never_cache_headers(response)
    return response


def _new_token_from_cookie(request: HttpRequest) -> dict[str, object] | None:
    """The token created by the previous POST, if its cookie is genuine, fresh and this user's."""
    value = request.COOKIES.get(NEW_TOKEN_COOKIE)
    if not value:
        return None
    try:
        data = signing.loads(value, salt=NEW_TOKEN_SALT, max_age=NEW_TOKEN_MAX_AGE)
    except signing.BadSignature:  # includes SignatureExpired
        return None
    if not isinstance(data, dict) or data.get("user") != request.user.pk:
        return None
    return data


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

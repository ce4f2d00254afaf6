"""Log-in security: who the client is, when a log-in is refused, what a refusal looks like, and what
a password change undoes. django-axes counts the failures; this module holds the platform's choices
(docs/security.md, "Logins and accounts").

* Every password log-in (the log-in page, the admin's, the browsable API's and POST /api/auth/token/)
  goes through ``django.contrib.auth.authenticate(request=...)``, where axes' backend refuses a
  locked-out client and axes' signal handler records the failure.
* Failures are counted per user name *and* per client address, independently: rotating addresses
  does not help against one user name, rotating user names does not help from one address.
* The user name lock has an exception, so an attacker cannot keep a user out of their account: from
  an address the user has logged in from before (``KNOWN_ADDRESS_DAYS``), only that address's
  failures count (per user name there, and in total).
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

from axes.models import AccessAttempt, AccessLog
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from rest_framework import status
from rest_framework.exceptions import APIException

from accounts.models import ApiToken

#: A successful log-in from an address makes it "known" to that user name for this long.
KNOWN_ADDRESS_DAYS = 30

SIGNUP_CHOICES = ("open", "closed")


# --- who the client is ----------------------------------------------------------------------------
def client_ip(request: Any) -> str | None:
    """The client's address: ``REMOTE_ADDR``, or with ``FINETUNE_TRUSTED_PROXIES`` = N > 0 the address
    the outermost of those N proxies saw, i.e. the N-th ``X-Forwarded-For`` entry from the right (the
    same rule as DRF's ``NUM_PROXIES``, which settings sets to the same N). Whatever a client puts
    further left in the header is ignored, so it cannot choose its address. An entry that is not an
    IP address falls back to ``REMOTE_ADDR`` (axes stores it in an address column)."""
    remote = request.META.get("REMOTE_ADDR") or None
    proxies = settings.FINETUNE_TRUSTED_PROXIES
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if proxies <= 0 or not forwarded:
        return remote
    hops = [hop.strip() for hop in forwarded.split(",")]
    candidate = hops[-min(proxies, len(hops))]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return remote


# --- when a log-in is refused ------------------------------------------------------------------------
def _username(credentials: dict[str, Any] | None) -> str | None:
    return (credentials or {}).get(settings.AXES_USERNAME_FORM_FIELD) or None


def is_known_address(*, username: str | None, ip: str | None) -> bool:
    """Has ``username`` logged in successfully from ``ip`` within ``KNOWN_ADDRESS_DAYS``?"""
    if not username or not ip:
        return False
    since = timezone.now() - timedelta(days=KNOWN_ADDRESS_DAYS)
    return AccessLog.objects.filter(username=username, ip_address=ip, attempt_time__gte=since).exists()


def lockout_parameters(request: Any, credentials: dict[str, Any] | None = None) -> list[Any]:
    """axes' ``AXES_LOCKOUT_PARAMETERS``: which failure counts lock this attempt out.

    Normally the user name's failures (from anywhere) and the address's failures (for any user name).
    From an address the user name has logged in from before, the user name's failures from *other*
    addresses do not count: that is what lets the owner in while someone else keeps the user name
    locked. Only the address's own failures (for this user name, and in total) apply there."""
    ip = getattr(request, "axes_ip_address", None) or client_ip(request)
    if is_known_address(username=_username(credentials), ip=ip):
        return [["username", "ip_address"], "ip_address"]
    return ["username", "ip_address"]


def forget_failures(*, username: str, ip: str | None) -> int:
    """A correct password clears the failures of that user name *from that address* (the owner's own
    typos). axes' own AXES_RESET_ON_SUCCESS would also clear every failure of the address, for every
    user name: anyone with an account could then reset their address's count by logging into it
    between guesses at another user's password."""
    if ip is None:  # Client.force_login and other requests without an address
        return 0
    deleted, _ = AccessAttempt.objects.filter(username=username, ip_address=ip).delete()
    return deleted


def token_login_succeeded(request: Any, user: AbstractBaseUser) -> None:
    """What a successful page log-in does through ``user_logged_in`` (axes' access log, the reset of
    this address's failures), for POST /api/auth/token/, which opens no session."""
    if not settings.AXES_ENABLED:
        return
    ip = getattr(request, "axes_ip_address", None) or client_ip(request)
    AccessLog.objects.create(
        username=user.get_username(),
        ip_address=ip,
        user_agent=request.META.get("HTTP_USER_AGENT", "<unknown>")[:255],
        http_accept=request.META.get("HTTP_ACCEPT", "<unknown>")[:1025],
        path_info=request.META.get("PATH_INFO", "<unknown>")[:255],
        session_hash="",
    )
    forget_failures(username=user.get_username(), ip=ip)


# --- what a refusal looks like -----------------------------------------------------------------------
def cooloff_minutes() -> int:
    return max(1, round(settings.AXES_COOLOFF_TIME.total_seconds() / 60))


def lockout_message() -> str:
    minutes = cooloff_minutes()
    return ngettext(
        "Too many failed log-ins for this user name or from this address. Try again in %(minutes)d minute, "
        "or ask an operator to unlock it.",
        "Too many failed log-ins for this user name or from this address. Try again in %(minutes)d minutes, "
        "or ask an operator to unlock it.",
        minutes,
    ) % {"minutes": minutes}


class LoginLockedOut(APIException):
    """429 from POST /api/auth/token/ while axes refuses the user name or the address."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "locked_out"

    def __init__(self) -> None:
        super().__init__(lockout_message())
        self.wait = int(settings.AXES_COOLOFF_TIME.total_seconds())


def lockout_response(request: HttpRequest, *args: Any) -> HttpResponse:
    """axes' ``AXES_LOCKOUT_CALLABLE`` (AxesMiddleware calls it for a refused log-in page): a plain
    429 page, or ``{"detail": ...}`` under /api/ (except the browsable API's HTML log-in)."""
    message = lockout_message()
    if request.path.startswith("/api/") and not request.path.startswith("/api/browse/"):
        response: HttpResponse = JsonResponse({"detail": message}, status=status.HTTP_429_TOO_MANY_REQUESTS)
    else:
        response = render(request, "registration/locked_out.html", {"message": message},
                          status=status.HTTP_429_TOO_MANY_REQUESTS)
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response


# --- sign-up --------------------------------------------------------------------------------------
def signup_open() -> bool:
    return settings.FINETUNE_SIGNUP == "open"


def signup_context(request: HttpRequest) -> dict[str, bool]:
    """Template context processor: ``signup_open`` hides the sign-up links when sign-up is closed."""
    return {"signup_open": signup_open()}


# --- a password change ends the API tokens --------------------------------------------------------------
class RevokeTokensOnPasswordChange:
    """Listed in AUTH_PASSWORD_VALIDATORS for its ``password_changed`` hook, which Django calls
    whenever a user is saved after ``set_password()``: the password change page, the admin's
    "change password" form, ``manage.py changepassword``, a shell. It validates nothing.

    Revoking there covers every way a password changes, where a signal on one view would miss the
    others. (A hasher upgrade at log-in rewrites the hash without calling the hook.) A new user has no
    tokens yet, so the hook is a no-op at sign-up."""

    def validate(self, password: str, user: AbstractBaseUser | None = None) -> None:
        return None

    def password_changed(self, password: str, user: AbstractBaseUser | None = None) -> None:
        if user is not None and user.pk is not None:
            ApiToken.objects.filter(user=user, revoked_at__isnull=True).update(revoked_at=timezone.now())

    def get_help_text(self) -> str:
        return _("Changing your password revokes all your API tokens.")

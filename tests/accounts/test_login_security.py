"""Log-in security (docs/security.md, "Logins and accounts"): failed log-ins are counted per user name
and per client address on every log-in route and lock out with a 429; sign-up can be closed and
refuses weak passwords; the API's description needs a log-in; transport-security settings come from
the environment; a token cannot mint tokens and a password change revokes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import AsyncClient, Client, RequestFactory, override_settings
from rest_framework.test import APIClient

from accounts.models import ApiToken
from accounts.security import client_ip
from accounts.services import api_token_create

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "olga-pass-123"  # the ``staff`` fixture's: staff may log in on all four routes
ROUTES = ["/accounts/login/", "/admin/login/", "/api/browse/login/", "/api/auth/token/"]
LIMIT = 10  # FINETUNE_LOGIN_FAILURES' default


@pytest.fixture(autouse=True)
def _fast_hasher(settings: Any) -> None:
    """Every attempt below hashes a password; the default hasher takes ~0.3 s a time here."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def attempt(route: str, username: str, password: str, **client: Any) -> Any:
    """One log-in on ``route``; ``client`` sets request defaults such as REMOTE_ADDR or a header."""
    if route == "/api/auth/token/":
        return APIClient(**client).post(route, {"username": username, "password": password}, format="json")
    return Client(**client).post(route, {"username": username, "password": password})


def succeeded(route: str, response: Any) -> bool:
    return response.status_code == (200 if route == "/api/auth/token/" else 302)


def assert_refused(route: str, response: Any) -> None:
    assert response.status_code == 429, (route, response.status_code)
    assert response["Retry-After"] == str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    text = response.json()["detail"] if route.startswith("/api/auth/") else response.content.decode()
    assert "Too many failed log-ins" in text and "15 minutes" in text


# --- per user name, per address, whatever the headers say -------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
def test_the_eleventh_wrong_password_for_one_user_name_is_429_whatever_x_forwarded_for_says(
    staff: User, route: str
) -> None:
    # With no trusted proxy (the default) X-Forwarded-For is the client's to write: it changes nothing.
    for i in range(1, LIMIT):
        response = attempt(route, "olga", "wrong", HTTP_X_FORWARDED_FOR=f"10.0.0.{i}")
        assert response.status_code in (200, 400), (i, response.status_code)
    # The tenth failure locks (its answer says so already); from then on nothing is even checked.
    assert_refused(route, attempt(route, "olga", "wrong", HTTP_X_FORWARDED_FOR="10.0.0.10"))
    assert_refused(route, attempt(route, "olga", "wrong", HTTP_X_FORWARDED_FOR="10.0.0.11"))
    assert_refused(route, attempt(route, "olga", PASSWORD, HTTP_X_FORWARDED_FOR="10.9.9.9"))
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"127.0.0.1"}


@pytest.mark.parametrize("route", ["/accounts/login/", "/api/auth/token/"])
def test_rotating_client_addresses_does_not_help_against_one_user_name(staff: User, route: str) -> None:
    for i in range(LIMIT):
        attempt(route, "olga", "wrong", REMOTE_ADDR=f"198.51.100.{i}")
    # A fresh address, the right password: the user name is locked for addresses it never logged in from.
    assert_refused(route, attempt(route, "olga", PASSWORD, REMOTE_ADDR="198.51.100.200"))


@pytest.mark.parametrize("route", ["/accounts/login/", "/admin/login/", "/api/browse/login/", "/api/auth/token/"])
def test_rotating_user_names_does_not_help_from_one_address(staff: User, route: str) -> None:
    for i in range(LIMIT):
        attempt(route, f"user{i}", "wrong", REMOTE_ADDR="192.0.2.7")
    # Every user name is refused from that address now, the right password of a real one included ...
    assert_refused(route, attempt(route, "olga", PASSWORD, REMOTE_ADDR="192.0.2.7"))
    # ... and only from that address.
    assert succeeded(route, attempt(route, "olga", PASSWORD, REMOTE_ADDR="192.0.2.8"))


@pytest.mark.parametrize("route", ROUTES)
def test_a_correct_login_resets_the_count(staff: User, route: str) -> None:
    for _ in range(LIMIT - 1):
        assert attempt(route, "olga", "wrong").status_code != 429
    assert succeeded(route, attempt(route, "olga", PASSWORD))
    for _ in range(LIMIT - 1):
        assert attempt(route, "olga", "wrong").status_code != 429
    assert_refused(route, attempt(route, "olga", "wrong"))


def test_logging_into_my_own_account_does_not_reset_my_guesses_at_someone_elses(alice: User, bob: User) -> None:
    # Bob guesses at alice's password, logging into his own account between guesses.
    for _ in range(LIMIT - 1):
        attempt("/accounts/login/", "alice", "guess")
        assert succeeded("/accounts/login/", attempt("/accounts/login/", "bob", "bob-pass-123"))
    assert_refused("/accounts/login/", attempt("/accounts/login/", "alice", "guess"))


def test_the_owner_still_logs_in_from_an_address_they_used_before_while_someone_locks_their_name(
    alice: User,
) -> None:
    home = {"REMOTE_ADDR": "203.0.113.5"}
    assert succeeded("/accounts/login/", attempt("/accounts/login/", "alice", "alice-pass-123", **home))
    for i in range(LIMIT + 5):  # an attacker from many addresses keeps the user name locked
        attempt("/api/auth/token/", "alice", "guess", REMOTE_ADDR=f"198.51.100.{i}")
    elsewhere = {"REMOTE_ADDR": "198.51.100.99"}
    assert_refused("/accounts/login/", attempt("/accounts/login/", "alice", "alice-pass-123", **elsewhere))
    # From her usual address only that address's failures count: she gets in, on a page and the API.
    assert succeeded("/accounts/login/", attempt("/accounts/login/", "alice", "alice-pass-123", **home))
    assert succeeded("/api/auth/token/", attempt("/api/auth/token/", "alice", "alice-pass-123", **home))
    # Her own typos there still lock her address in the end.
    for _ in range(LIMIT):
        attempt("/accounts/login/", "alice", "typo", **home)
    assert_refused("/accounts/login/", attempt("/accounts/login/", "alice", "alice-pass-123", **home))


def test_a_lockout_ends_after_the_cooloff(staff: User) -> None:
    for _ in range(LIMIT):
        attempt("/accounts/login/", "olga", "wrong")
    assert_refused("/accounts/login/", attempt("/accounts/login/", "olga", PASSWORD))
    AccessAttempt.objects.update(attempt_time=AccessAttempt.objects.get().attempt_time - settings.AXES_COOLOFF_TIME)
    assert succeeded("/accounts/login/", attempt("/accounts/login/", "olga", PASSWORD))


def test_the_limits_come_from_the_settings(staff: User) -> None:
    with override_settings(AXES_FAILURE_LIMIT=2):
        assert attempt("/api/auth/token/", "olga", "wrong").status_code == 400
        assert attempt("/api/auth/token/", "olga", "wrong").status_code == 429


def test_the_lockout_page_works_through_the_asgi_application(staff: User) -> None:
    client = AsyncClient()
    for _ in range(LIMIT - 1):
        response = async_to_sync(client.post)("/accounts/login/", {"username": "olga", "password": "wrong"})
        assert response.status_code == 200
    response = async_to_sync(client.post)("/accounts/login/", {"username": "olga", "password": PASSWORD})
    assert response.status_code == 302  # the right password still works below the limit
    for _ in range(LIMIT):
        response = async_to_sync(client.post)("/accounts/login/", {"username": "olga", "password": "wrong"})
    assert_refused("/accounts/login/", response)


def test_a_username_longer_than_a_user_name_can_be_is_a_400_not_a_stored_attempt(db: None) -> None:
    response = attempt("/api/auth/token/", "x" * 5000, "wrong")
    assert response.status_code == 400 and "username" in response.json()
    assert not AccessAttempt.objects.exists()


# --- the client address ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("proxies", "forwarded", "expected"),
    [
        (0, None, "192.0.2.1"),
        (0, "203.0.113.9", "192.0.2.1"),  # no trusted proxy: the header is the client's own text
        (1, "203.0.113.9", "203.0.113.9"),
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # what the client wrote itself is further left
        (2, "6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
        (2, "203.0.113.9", "203.0.113.9"),
        (1, "not-an-address", "192.0.2.1"),
        (1, "2001:db8::1", "2001:db8::1"),
    ],
)
def test_the_client_address_trusts_only_the_configured_proxies(
    settings: Any, proxies: int, forwarded: str | None, expected: str
) -> None:
    settings.FINETUNE_TRUSTED_PROXIES = proxies
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    request = RequestFactory().post("/accounts/login/", REMOTE_ADDR="192.0.2.1", **headers)
    assert client_ip(request) == expected


def test_drf_throttles_trust_the_same_proxies() -> None:
    assert settings.REST_FRAMEWORK["NUM_PROXIES"] == settings.FINETUNE_TRUSTED_PROXIES == 0


def test_behind_one_trusted_proxy_the_forwarded_address_is_the_one_locked(settings: Any, staff: User) -> None:
    settings.FINETUNE_TRUSTED_PROXIES = 1
    for i in range(LIMIT):  # user names rotate, the proxy reports one client
        attempt("/accounts/login/", f"user{i}", "wrong", HTTP_X_FORWARDED_FOR=f"6.6.6.{i}, 203.0.113.9")
    assert_refused("/accounts/login/", attempt("/accounts/login/", "olga", PASSWORD,
                                               HTTP_X_FORWARDED_FOR="203.0.113.9"))
    # Another client behind the same proxy is not affected.
    assert succeeded("/accounts/login/", attempt("/accounts/login/", "olga", PASSWORD,
                                                 HTTP_X_FORWARDED_FOR="203.0.113.10"))


# --- sign-up -------------------------------------------------------------------------------------------
SIGNUP = {"username": "carol", "email": "", "password1": "Tr1cky-Passw0rd!", "password2": "Tr1cky-Passw0rd!"}


def test_open_sign_up_is_linked_from_the_login_page(db: None) -> None:
    html = Client().get("/accounts/login/").content.decode()
    assert html.count('href="/accounts/signup/"') == 2  # the top bar and the form


@override_settings(FINETUNE_SIGNUP="closed")
def test_closed_sign_up_is_hidden_and_refused(db: None) -> None:
    html = Client().get("/accounts/login/").content.decode()
    assert "/accounts/signup/" not in html
    assert "Ask an operator" in html
    page = Client().get("/accounts/signup/")
    assert page.status_code == 404
    assert "Sign-up is closed" in page.content.decode() and 'name="password1"' not in page.content.decode()
    assert Client().post("/accounts/signup/", SIGNUP).status_code == 404
    assert not User.objects.filter(username="carol").exists()


@pytest.mark.parametrize("password", ["password", "12345678", "carol-1", "carol123"])
def test_sign_up_refuses_weak_passwords(db: None, password: str) -> None:
    response = Client().post("/accounts/signup/", {**SIGNUP, "password1": password, "password2": password})
    assert response.status_code == 200
    assert response.context["form"].errors["password2"]
    assert not User.objects.filter(username="carol").exists()


def test_the_password_reset_pages_are_gone(db: None) -> None:
    # No e-mail is configured (an operator sets passwords in the admin); an open reset form mailed anyone.
    assert Client().get("/accounts/password_reset/").status_code == 404
    assert Client().post("/accounts/password_reset/", {"email": "a@example.com"}).status_code == 404


# --- the API's description needs a log-in ---------------------------------------------------------------
def test_the_api_schema_and_docs_need_a_login(alice: User) -> None:
    assert APIClient().get("/api/schema/").status_code == 401
    for url in ("/api/docs/", "/api/redoc/"):
        response = Client().get(url)
        assert response.status_code == 302 and response.url == f"/accounts/login/?next={url}"
    page = Client()
    page.force_login(alice)
    for url in ("/api/schema/", "/api/docs/", "/api/redoc/"):
        assert page.get(url).status_code == 200, url
    _, raw = api_token_create(user=alice, name="script")
    assert APIClient(HTTP_AUTHORIZATION=f"Token {raw}").get("/api/schema/").status_code == 200


# --- transport security from the environment ----------------------------------------------------------------
_PRINT = """
import json
import finetune_platform.settings as s
print(json.dumps({name: getattr(s, name) for name in (
    "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_PROXY_SSL_HEADER", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_HTTPONLY", "X_FRAME_OPTIONS",
    "SECURE_REFERRER_POLICY", "SECURE_CONTENT_TYPE_NOSNIFF", "ALLOWED_HOSTS", "FINETUNE_SIGNUP",
    "FINETUNE_TRUSTED_PROXIES", "REST_FRAMEWORK", "AXES_FAILURE_LIMIT", "AXES_COOLOFF_TIME",
)}, default=str))
"""


def settings_with(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Read finetune_platform.settings in a fresh interpreter with only ``env`` set."""
    base = {"PATH": os.environ["PATH"], "FINETUNE_DATA_DIR": str(tmp_path), "SECRET_KEY": "x" * 50}
    return subprocess.run([sys.executable, "-c", _PRINT], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def test_transport_security_is_off_by_default_and_the_headers_are_strict(tmp_path: Path) -> None:
    values = json.loads(settings_with(tmp_path).stdout)
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is False
    assert values["SECURE_HSTS_SECONDS"] == 0 and values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is False
    assert values["SECURE_PROXY_SSL_HEADER"] is None and values["SECURE_SSL_REDIRECT"] is False
    assert values["SESSION_COOKIE_HTTPONLY"] is True and values["SECURE_CONTENT_TYPE_NOSNIFF"] is True
    assert values["X_FRAME_OPTIONS"] == "DENY" and values["SECURE_REFERRER_POLICY"] == "same-origin"
    assert values["ALLOWED_HOSTS"] == ["127.0.0.1", "localhost"]
    assert values["FINETUNE_SIGNUP"] == "open"
    assert values["FINETUNE_TRUSTED_PROXIES"] == 0 and values["REST_FRAMEWORK"]["NUM_PROXIES"] == 0
    assert values["AXES_FAILURE_LIMIT"] == 10 and values["AXES_COOLOFF_TIME"] == "0:15:00"


def test_transport_security_and_login_limits_come_from_the_environment(tmp_path: Path) -> None:
    values = json.loads(settings_with(
        tmp_path, FINETUNE_SECURE_COOKIES="1", FINETUNE_HSTS_SECONDS="31536000", FINETUNE_HSTS_INCLUDE_SUBDOMAINS="yes",
        FINETUNE_PROXY_SSL_HEADER="true", FINETUNE_SSL_REDIRECT="on", FINETUNE_SIGNUP="closed",
        FINETUNE_TRUSTED_PROXIES="1", FINETUNE_LOGIN_FAILURES="5", FINETUNE_LOGIN_COOLOFF_MINUTES="60",
    ).stdout)
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is True
    assert values["SECURE_HSTS_SECONDS"] == 31536000 and values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["SECURE_SSL_REDIRECT"] is True and values["FINETUNE_SIGNUP"] == "closed"
    assert values["FINETUNE_TRUSTED_PROXIES"] == 1 and values["REST_FRAMEWORK"]["NUM_PROXIES"] == 1
    assert values["AXES_FAILURE_LIMIT"] == 5 and values["AXES_COOLOFF_TIME"] == "1:00:00"


@pytest.mark.parametrize(
    ("name", "value"),
    [("FINETUNE_SIGNUP", "opne"), ("FINETUNE_SECURE_COOKIES", "sometimes"), ("FINETUNE_TRUSTED_PROXIES", "-1"),
     ("FINETUNE_LOGIN_FAILURES", "0")],
)
def test_a_typo_in_a_security_setting_stops_start_up(tmp_path: Path, name: str, value: str) -> None:
    result = settings_with(tmp_path, **{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and name in result.stderr


def test_pages_send_the_security_headers(db: None) -> None:
    response = Client().get("/accounts/login/")
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Content-Type-Options"] == "nosniff"


# --- API tokens --------------------------------------------------------------------------------------------
def test_a_token_cannot_mint_a_token(alice: User) -> None:
    _, raw = api_token_create(user=alice, name="leaked")
    response = APIClient(HTTP_AUTHORIZATION=f"Token {raw}").post("/api/auth/tokens/", {"name": "more"}, format="json")
    assert response.status_code == 403
    assert "password" in response.json()["detail"]
    assert list(ApiToken.objects.values_list("name", flat=True)) == ["leaked"]
    # A logged-in session (the browsable API, the profile page) and a password still can.
    session = APIClient()
    session.force_login(alice)
    assert session.post("/api/auth/tokens/", {"name": "more"}, format="json").status_code == 201
    assert attempt("/api/auth/token/", "alice", "alice-pass-123").status_code == 200


def test_changing_the_password_on_its_page_revokes_every_token(alice: User, bob: User) -> None:
    _, alices = api_token_create(user=alice, name="laptop")
    _, bobs = api_token_create(user=bob, name="laptop")
    page = Client()
    page.force_login(alice)
    response = page.post("/accounts/password_change/", {
        "old_password": "alice-pass-123", "new_password1": "An0ther-Passw0rd!", "new_password2": "An0ther-Passw0rd!",
    })
    assert response.status_code == 302, response.content
    assert APIClient(HTTP_AUTHORIZATION=f"Token {alices}").get("/api/finetuning/tasks/").status_code == 401
    assert not ApiToken.objects.filter(user=alice).active().exists()
    assert APIClient(HTTP_AUTHORIZATION=f"Token {bobs}").get("/api/finetuning/tasks/").status_code == 200
    assert page.get("/").status_code == 200  # the session that changed it stays logged in


def test_a_password_set_anywhere_else_revokes_the_tokens_too(alice: User) -> None:
    api_token_create(user=alice, name="laptop")
    alice.set_password("An0ther-Passw0rd!")  # the admin's form, manage.py changepassword, a shell
    alice.save()
    assert not ApiToken.objects.filter(user=alice).active().exists()


def test_saving_a_user_without_a_new_password_keeps_the_tokens(alice: User) -> None:
    api_token_create(user=alice, name="laptop")
    alice.first_name = "Alice"
    alice.save()
    assert attempt("/accounts/login/", "alice", "alice-pass-123").status_code == 302
    assert ApiToken.objects.filter(user=alice).active().count() == 1


def test_a_new_token_is_shown_once_and_never_stored_in_the_session(alice: User) -> None:
    page = Client()
    page.force_login(alice)
    response = page.post("/accounts/profile/", {"name": "notebook"})
    assert response.status_code == 302
    cookie = response.cookies["ftp_new_token"]
    assert cookie["httponly"] and cookie["path"] == "/accounts/profile/" and cookie["max-age"] == 60
    assert cookie["samesite"] == "Strict"
    shown = page.get("/accounts/profile/")
    raw = shown.context["new_token"]["token"]
    assert raw.startswith("ftp_") and raw in shown.content.decode()
    assert "no-store" in shown["Cache-Control"]
    for session in Session.objects.all():
        assert raw not in json.dumps(session.get_decoded())
    assert raw not in page.get("/accounts/profile/").content.decode()  # the cookie was deleted


def test_a_forged_or_someone_elses_new_token_cookie_shows_nothing(alice: User, bob: User) -> None:
    page = Client()
    page.force_login(alice)
    page.post("/accounts/profile/", {"name": "notebook"})
    stolen = page.cookies["ftp_new_token"].value
    other = Client()
    other.force_login(bob)
    other.cookies["ftp_new_token"] = stolen
    assert other.get("/accounts/profile/").context["new_token"] is None
    other.cookies["ftp_new_token"] = stolen[:-2] + "xx"
    assert other.get("/accounts/profile/").context["new_token"] is None

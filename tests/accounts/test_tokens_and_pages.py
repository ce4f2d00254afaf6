"""API tokens (obtain, several named ones, revoke, hashed storage), session auth with CSRF, and the
account pages: sign-up, log-in, log-out, the dashboard's empty state and the API docs."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiToken

TASKS_URL = "/api/finetuning/tasks/"


def obtain(username: str, password: str, **extra: Any) -> Any:
    return APIClient().post("/api/auth/token/", {"username": username, "password": password, **extra}, format="json")


def client_with(header: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    return client


def session_api(user: User) -> APIClient:
    """A logged-in browser session on the API (a token cannot create tokens; a session can)."""
    client = APIClient()
    client.force_login(user)
    return client


@pytest.fixture
def alice_token(alice: User) -> str:
    response = obtain("alice", "alice-pass-123")
    assert response.status_code == 200, response.content
    return response.json()["token"]


# --- obtaining a token ----------------------------------------------------------------------------
def test_username_and_password_give_a_token_with_its_id_and_name(alice: User) -> None:
    response = obtain("alice", "alice-pass-123")
    assert response.status_code == 200, response.content
    data = response.json()
    assert set(data) == {"token", "id", "name"}
    assert data["token"].startswith("ftp_") and len(data["token"]) > 40
    assert data["name"] == "API token"
    row = ApiToken.objects.get(pk=data["id"])
    assert row.user == alice and row.is_active and row.last_used_at is None


def test_the_token_can_be_named_when_obtained(alice: User) -> None:
    response = obtain("alice", "alice-pass-123", name="laptop")
    assert response.status_code == 200
    assert response.json()["name"] == "laptop"
    assert ApiToken.objects.get(pk=response.json()["id"]).name == "laptop"


@pytest.mark.parametrize("keyword", ["Token", "Bearer", "token", "bearer"])
def test_the_token_works_with_the_token_and_the_bearer_keywords(alice_token: str, keyword: str) -> None:
    response = client_with(f"{keyword} {alice_token}").get(TASKS_URL)
    assert response.status_code == 200, response.content
    assert response.json()["count"] == 0


def test_a_wrong_password_is_a_400_naming_the_password_and_creates_no_token(alice: User) -> None:
    response = obtain("alice", "not-her-password")
    assert response.status_code == 400
    assert "password" in response.json()
    assert "token" not in response.json()
    assert ApiToken.objects.count() == 0


def test_an_unknown_user_is_a_400_and_creates_no_token(db: None) -> None:
    response = obtain("nobody", "whatever-123")
    assert response.status_code == 400
    assert "password" in response.json()
    assert ApiToken.objects.count() == 0


def test_a_missing_username_is_a_400_naming_the_username(alice: User) -> None:
    response = APIClient().post("/api/auth/token/", {"password": "alice-pass-123"}, format="json")
    assert response.status_code == 400
    assert "username" in response.json()
    assert ApiToken.objects.count() == 0


def test_an_inactive_user_gets_no_token(alice: User) -> None:
    alice.is_active = False
    alice.save()
    response = obtain("alice", "alice-pass-123")
    assert response.status_code == 400
    assert ApiToken.objects.count() == 0


def test_only_the_sha256_of_the_token_is_stored(alice_token: str) -> None:
    row = ApiToken.objects.get()
    assert row.key_hash == hashlib.sha256(alice_token.encode()).hexdigest()
    assert row.key_prefix == alice_token[:8]
    stored = ApiToken.objects.filter(pk=row.pk).values().get()
    for field, value in stored.items():
        assert alice_token not in str(value), field
    # The secret part is not recoverable from what is stored.
    assert alice_token[8:] not in " ".join(str(v) for v in stored.values())


# --- several named tokens, listing and revoking ------------------------------------------------
def test_a_user_can_hold_several_named_tokens(alice_api: APIClient, alice: User) -> None:
    response = session_api(alice).post("/api/auth/tokens/", {"name": "notebook"}, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert set(data) == {"token", "id", "name"}
    assert data["name"] == "notebook"
    assert sorted(ApiToken.objects.filter(user=alice).values_list("name", flat=True)) == ["notebook", "tests"]
    # The new token works on its own.
    assert client_with(f"Token {data['token']}").get(TASKS_URL).status_code == 200


def test_creating_a_token_needs_a_name(alice: User) -> None:
    response = session_api(alice).post("/api/auth/tokens/", {}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_creating_a_token_needs_authentication(alice: User) -> None:
    response = APIClient().post("/api/auth/tokens/", {"name": "notebook"}, format="json")
    assert response.status_code == 401
    assert ApiToken.objects.count() == 0


def test_the_token_list_shows_only_my_tokens_without_the_secret(
    alice_api: APIClient, bob_api: APIClient, alice: User
) -> None:
    created = session_api(alice).post("/api/auth/tokens/", {"name": "notebook"}, format="json").json()
    response = alice_api.get("/api/auth/tokens/")
    assert response.status_code == 200
    results = response.json()["results"]
    assert response.json()["count"] == 2
    assert {item["name"] for item in results} == {"tests", "notebook"}
    assert {item["id"] for item in results} == set(ApiToken.objects.filter(user=alice).values_list("pk", flat=True))
    for item in results:
        assert set(item) == {"id", "name", "key_prefix", "created_at", "last_used_at", "revoked_at", "is_active"}
    body = response.content.decode()
    assert created["token"] not in body
    for key_hash in ApiToken.objects.values_list("key_hash", flat=True):
        assert key_hash not in body
    # Bob sees his own token only.
    bob_results = bob_api.get("/api/auth/tokens/").json()["results"]
    assert [item["name"] for item in bob_results] == ["tests"]
    assert bob_results[0]["id"] not in {item["id"] for item in results}


def test_deleting_a_token_revokes_it_and_leaves_the_others_working(alice_api: APIClient, alice: User) -> None:
    created = session_api(alice).post("/api/auth/tokens/", {"name": "notebook"}, format="json").json()
    notebook = client_with(f"Bearer {created['token']}")
    assert notebook.get(TASKS_URL).status_code == 200

    response = alice_api.delete(f"/api/auth/tokens/{created['id']}/")
    assert response.status_code == 204

    assert notebook.get(TASKS_URL).status_code == 401
    assert alice_api.get(TASKS_URL).status_code == 200
    row = ApiToken.objects.get(pk=created["id"])
    assert row.revoked_at is not None and not row.is_active
    listed = {item["id"]: item for item in alice_api.get("/api/auth/tokens/").json()["results"]}
    assert listed[created["id"]]["is_active"] is False
    # Revoking again is harmless.
    assert alice_api.delete(f"/api/auth/tokens/{created['id']}/").status_code == 204


def test_a_token_can_revoke_itself(alice_token: str) -> None:
    client = client_with(f"Token {alice_token}")
    token_id = ApiToken.objects.get().pk
    assert client.delete(f"/api/auth/tokens/{token_id}/").status_code == 204
    assert client.get(TASKS_URL).status_code == 401


def test_bob_gets_404_revoking_alices_token(alice_api: APIClient, bob_api: APIClient, alice: User) -> None:
    token = ApiToken.objects.get(user=alice)
    assert bob_api.delete(f"/api/auth/tokens/{token.pk}/").status_code == 404
    assert bob_api.get(f"/api/auth/tokens/{token.pk}/").status_code == 404
    token.refresh_from_db()
    assert token.is_active
    assert alice_api.get(TASKS_URL).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Token garbage",
        "Bearer ftp_not-a-real-token",
        "Token",
        "Token two parts",
    ],
)
def test_a_garbage_token_is_a_401(alice_api: APIClient, header: str) -> None:
    response = client_with(header).get(TASKS_URL)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Token"


def test_no_credentials_is_a_401(db: None) -> None:
    assert APIClient().get(TASKS_URL).status_code == 401


def test_a_token_of_an_inactive_user_is_a_401(alice_token: str, alice: User) -> None:
    alice.is_active = False
    alice.save()
    assert client_with(f"Token {alice_token}").get(TASKS_URL).status_code == 401


def test_using_a_token_records_when_it_was_last_used(alice_token: str) -> None:
    row = ApiToken.objects.get()
    assert row.last_used_at is None
    assert client_with(f"Token {alice_token}").get(TASKS_URL).status_code == 200
    row.refresh_from_db()
    assert row.last_used_at is not None
    assert row.last_used_at >= row.created_at


# --- session authentication and CSRF ------------------------------------------------------------
def test_a_logged_in_session_reads_the_api_and_needs_a_csrf_token_to_write(alice: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get(TASKS_URL).status_code == 200

    response = client.post(TASKS_URL, {"name": "colors"}, content_type="application/json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]

    # With the CSRF token of a page the request passes authentication (and fails validation).
    assert client.get("/").status_code == 200
    csrf = client.cookies[settings.CSRF_COOKIE_NAME].value
    response = client.post(TASKS_URL, {"name": "colors"}, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 400, response.content
    assert "base_model" in response.json()


def test_token_requests_need_no_csrf_token(alice_token: str) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {alice_token}")
    # Past authentication (no 403 for a missing CSRF token): the body's validation answers.
    response = client.post(TASKS_URL, {"name": "colors"}, format="json")
    assert response.status_code == 400, response.content
    assert "base_model" in response.json()


# --- sign-up, log-in, log-out and the dashboard -------------------------------------------------
def test_the_signup_page_renders(db: None) -> None:
    response = Client().get("/accounts/signup/")
    assert response.status_code == 200
    assert 'name="password1"' in response.content.decode()


def test_signing_up_creates_the_user_logs_them_in_and_goes_home(db: None) -> None:
    client = Client()
    response = client.post(
        "/accounts/signup/",
        {
            "username": "carol",
            "email": "carol@example.com",
            "password1": "Tr1cky-Passw0rd!",
            "password2": "Tr1cky-Passw0rd!",
        },
    )
    assert response.status_code == 302
    assert response.url == "/"
    user = User.objects.get(username="carol")
    assert user.email == "carol@example.com"
    assert user.check_password("Tr1cky-Passw0rd!")
    assert not user.is_staff
    assert client.session["_auth_user_id"] == str(user.pk)
    home = client.get("/")
    assert home.status_code == 200
    assert "carol" in home.content.decode()


def test_a_mismatched_password_rerenders_the_form_and_creates_no_user(db: None) -> None:
    response = Client().post(
        "/accounts/signup/",
        {
            "username": "carol",
            "email": "carol@example.com",
            "password1": "Tr1cky-Passw0rd!",
            "password2": "other-Passw0rd!",
        },
    )
    assert response.status_code == 200
    assert response.context["form"].errors["password2"]
    assert not User.objects.filter(username="carol").exists()


def test_a_weak_password_is_refused(db: None) -> None:
    response = Client().post(
        "/accounts/signup/", {"username": "carol", "email": "", "password1": "123", "password2": "123"}
    )
    assert response.status_code == 200
    assert not User.objects.filter(username="carol").exists()


def test_a_taken_username_is_refused(alice: User) -> None:
    response = Client().post(
        "/accounts/signup/",
        {"username": "alice", "email": "", "password1": "Tr1cky-Passw0rd!", "password2": "Tr1cky-Passw0rd!"},
    )
    assert response.status_code == 200
    assert response.context["form"].errors["username"]
    assert User.objects.filter(username="alice").count() == 1


def test_a_logged_in_user_visiting_signup_goes_home(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.get("/accounts/signup/")
    assert response.status_code == 302
    assert response.url == "/"


def test_the_login_page_logs_in_and_goes_home(alice: User) -> None:
    client = Client()
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert response.url == "/"
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_a_wrong_password_on_the_login_page_does_not_log_in(alice: User) -> None:
    client = Client()
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session


def test_the_dashboard_sends_an_anonymous_visitor_to_the_login_page(db: None) -> None:
    response = Client().get("/")
    assert response.status_code == 302
    assert response.url == "/accounts/login/?next=/"


def test_the_dashboard_of_a_user_without_tasks_shows_the_empty_state(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "No tasks yet" in html
    assert "Welcome, alice" in html


def test_logging_out_with_a_post_ends_the_session(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert response.url == "/accounts/login/"
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302


def test_logging_out_with_a_get_is_refused(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    assert client.get("/accounts/logout/").status_code == 405
    assert client.session["_auth_user_id"] == str(alice.pk)


# --- API documentation ------------------------------------------------------------------------------
def test_the_api_schema_is_served_to_a_logged_in_user(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.get("/api/schema/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "/api/auth/token/" in body
    assert "/api/finetuning/tasks/" in body


def test_the_swagger_page_is_served_without_any_external_cdn(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode().lower()
    assert "swagger" in html
    assert "/api/schema/" in html
    for external in ("cdn.", "unpkg", "jsdelivr"):
        assert external not in html, external

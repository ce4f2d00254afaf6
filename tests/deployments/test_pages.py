"""The deployment pages and the profile page with API tokens (create with a name, shown once, list,
revoke), rendered by the real views; another user's objects are 404."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiToken, hash_token
from deployments import services
from deployments.models import Deployment, DeploymentStatus
from tests.conftest import announce_host
from tests.deployments.test_services_and_api import make_task


@pytest.fixture
def page(alice: User) -> Client:
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def host(db: None) -> Any:
    return announce_host(cpu=1)


def test_the_list_page_shows_deployments_and_creates_one_from_a_task(alice: User, page: Client, host: Any) -> None:
    task = make_task(alice, name="colors-lora")
    response = page.get("/deployments/")
    assert response.status_code == 200
    assert "colors-lora" in response.content.decode()  # offered in the form
    response = page.post("/deployments/", {"name": "Colors", "source": "task", "task": str(task.pk),
                                           "backend": "transformers", "gpu_mode": "cpu"})
    deployment = Deployment.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/deployments/{deployment.pk}/"
    assert deployment.task == task and deployment.gpu_config == {"cpu": True}
    listing = page.get("/deployments/").content.decode()
    assert f'href="/deployments/{deployment.pk}/"' in listing and "badge-pending" in listing


def test_the_form_shows_the_services_errors_next_to_the_fields(alice: User, page: Client, host: Any) -> None:
    response = page.post("/deployments/", {"name": "m", "source": "model", "model": "/etc",
                                           "backend": "transformers", "gpu_mode": "cpu"})
    assert response.status_code == 400
    assert "allowed model root" in response.content.decode()
    assert not Deployment.objects.exists()


def test_the_detail_page_has_the_endpoint_a_snippet_the_log_and_the_playground(
    alice: User, page: Client, host: Any
) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="Colors", task=task.pk)
    html = page.get(f"/deployments/{deployment.pk}/").content.decode()
    endpoint = f"http://testserver/api/deployments/{deployment.pk}/v1"
    assert endpoint in html and f'base_url="{endpoint}"' in html  # the copyable client snippet
    assert 'model="colors"' in html and 'id="chat-form"' in html and 'id="log"' in html
    assert f"/deployments/{deployment.pk}/chat/" in html and "js/deployments.js" in html
    response = page.post(f"/deployments/{deployment.pk}/stop/")
    assert response.status_code == 302
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.STOPPED
    assert page.post(f"/deployments/{deployment.pk}/delete/").status_code == 302
    assert not Deployment.objects.filter(pk=deployment.pk).exists()


def test_bob_gets_404_on_alices_deployment_pages(alice: User, bob: User, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="mine", task=task.pk)
    client = Client()
    client.force_login(bob)
    assert "mine" not in client.get("/deployments/").content.decode()
    assert client.get(f"/deployments/{deployment.pk}/").status_code == 404
    assert client.post(f"/deployments/{deployment.pk}/stop/").status_code == 404
    assert client.post(f"/deployments/{deployment.pk}/delete/").status_code == 404
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.PENDING


def test_pages_need_a_login(db: None) -> None:
    response = Client().get("/deployments/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert "/accounts/login/" in Client().get("/accounts/profile/")["Location"]


# --- profile and API tokens ---------------------------------------------------------------------------
def test_a_token_is_created_with_a_name_shown_once_and_stored_hashed(alice: User, page: Client) -> None:
    assert page.get("/deployments/").content.decode().count('href="/accounts/profile/"') >= 1  # the nav link
    response = page.post("/accounts/profile/", {"name": "notebook"})
    assert response.status_code == 302
    html = page.get("/accounts/profile/").content.decode()
    raw = re.search(r'<code id="new-token" class="break">(ftp_[^<]+)</code>', html).group(1)
    row = ApiToken.objects.get(user=alice)
    assert row.name == "notebook" and row.key_hash == hash_token(raw) and raw not in row.key_hash
    assert "notebook" in html
    again = page.get("/accounts/profile/").content.decode()
    assert raw not in again and "notebook" in again  # shown once, listed afterwards
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/deployments/").status_code == 200


def test_a_revoked_token_gets_401(alice: User, page: Client) -> None:
    page.post("/accounts/profile/", {"name": "script"})
    raw = re.search(r"(ftp_[A-Za-z0-9_\-]+)", page.get("/accounts/profile/").content.decode()).group(1)
    row = ApiToken.objects.get(user=alice)
    response = page.post(f"/accounts/profile/tokens/{row.pk}/revoke/")
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.revoked_at is not None
    assert "Revoked" in page.get("/accounts/profile/").content.decode()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/deployments/").status_code == 401


def test_a_token_needs_a_name(page: Client) -> None:
    assert page.post("/accounts/profile/", {"name": ""}).status_code == 400
    assert not ApiToken.objects.exists()


def test_bob_cannot_revoke_alices_token(alice: User, bob: User, tmp_path: Path) -> None:
    from accounts.services import api_token_create

    row, _ = api_token_create(user=alice, name="alice's")
    client = Client()
    client.force_login(bob)
    assert client.post(f"/accounts/profile/tokens/{row.pk}/revoke/").status_code == 404
    assert "alice's" not in client.get("/accounts/profile/").content.decode()
    row.refresh_from_db()
    assert row.revoked_at is None


def test_staff_filter_and_stop_deployments_in_the_admin(alice: User, staff: User, host: Any) -> None:
    task = make_task(alice)
    deployment = services.deployment_create(owner=alice, name="admin-me", task=task.pk)
    client = Client()
    client.force_login(staff)
    listing = client.get("/admin/deployments/deployment/?status__exact=pending")
    assert listing.status_code == 200 and "admin-me" in listing.content.decode()
    detail = client.get(f"/admin/deployments/deployment/{deployment.pk}/change/")
    assert detail.status_code == 200
    response = client.post("/admin/deployments/deployment/", {"action": "stop_deployments",
                                                               "_selected_action": [deployment.pk]})
    assert response.status_code == 302
    deployment.refresh_from_db()
    assert deployment.status == DeploymentStatus.STOPPED and deployment.stop_reason == "Stopped by an operator"

"""Who is trusted with any hub id (docs/security.md, "Code from the hub"): staff, and users staff
marked trusted on the admin's user page. Nobody else, superuser status alone included."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser, User
from django.test import Client

from accounts.models import Account
from accounts.services import account_hub_trusted, account_set_hub_trusted


def admin_client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_user_without_an_account_row_is_not_trusted(alice: User) -> None:
    assert not Account.objects.filter(user=alice).exists()
    assert account_hub_trusted(user=alice) is False


def test_a_user_marked_trusted_is_trusted_until_it_is_taken_back(alice: User) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    assert account_hub_trusted(user=alice) is True
    account_set_hub_trusted(user=alice, trusted=False)
    assert account_hub_trusted(user=alice) is False
    assert Account.objects.filter(user=alice).count() == 1


def test_staff_are_trusted_without_the_flag(staff: User) -> None:
    assert account_hub_trusted(user=staff) is True


def test_a_superuser_who_is_not_staff_is_not_trusted_by_that_alone(db: None) -> None:
    root = User.objects.create_user("root-ish", password="x-pass-123", is_superuser=True, is_staff=False)
    assert account_hub_trusted(user=root) is False


def test_an_inactive_or_anonymous_user_is_never_trusted(alice: User) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    assert account_hub_trusted(user=alice) is False
    assert account_hub_trusted(user=AnonymousUser()) is False
    assert account_hub_trusted(user=None) is False


def test_bob_is_not_trusted_because_alice_is(alice: User, bob: User) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    assert account_hub_trusted(user=bob) is False


# --- the admin --------------------------------------------------------------------------------------
def test_the_user_page_shows_the_trust_flag_inline_with_its_explanation(staff: User, alice: User) -> None:
    page = admin_client(staff).get(f"/admin/auth/user/{alice.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="account-0-hub_trusted"' in html
    assert "FINETUNE_HUB_MODELS" in html  # the help text says what it allows


def test_staff_mark_a_user_trusted_on_the_user_page(staff: User, alice: User) -> None:
    client = admin_client(staff)
    data = {
        "username": alice.username, "email": alice.email, "first_name": "", "last_name": "", "is_active": "on",
        "date_joined_0": alice.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": alice.date_joined.strftime("%H:%M:%S"),
        "initial-date_joined_0": alice.date_joined.strftime("%Y-%m-%d"),
        "initial-date_joined_1": alice.date_joined.strftime("%H:%M:%S"),
        "account-TOTAL_FORMS": "1", "account-INITIAL_FORMS": "0", "account-MIN_NUM_FORMS": "0",
        "account-MAX_NUM_FORMS": "1", "account-0-hub_trusted": "on", "account-0-id": "",
        "account-0-user": str(alice.pk), "_save": "Save",
        # The page's quota inline, left empty (tests/accounts/test_quotas.py fills it).
        "quota-TOTAL_FORMS": "0", "quota-INITIAL_FORMS": "0", "quota-MIN_NUM_FORMS": "0", "quota-MAX_NUM_FORMS": "1",
    }
    response = client.post(f"/admin/auth/user/{alice.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert account_hub_trusted(user=alice) is True
    listing = client.get("/admin/auth/user/?account__hub_trusted__exact=1")
    assert listing.status_code == 200
    assert "alice" in listing.content.decode()


@pytest.mark.parametrize("path", ["/admin/accounts/account/", "/admin/auth/user/"])
def test_the_account_and_user_lists_open(staff: User, alice: User, path: str) -> None:
    account_set_hub_trusted(user=alice, trusted=True)
    assert admin_client(staff).get(path).status_code == 200

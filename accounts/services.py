"""Everything that changes accounts and tokens, and what they allow."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils import timezone

from accounts.models import Account, ApiToken, generate_token, hash_token


def api_token_create(*, user: AbstractBaseUser, name: str) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the raw token (shown to the user once)."""
    raw = generate_token()
    token = ApiToken.objects.create(
        user=user, name=name.strip() or "API token", key_hash=hash_token(raw), key_prefix=raw[:8]
    )
    return token, raw


def api_token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke a token; idempotent."""
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    return token


def api_token_authenticate(*, raw: str) -> ApiToken | None:
    """The active token for ``raw``, or None. Records use at most once a minute."""
    token = ApiToken.objects.select_related("user").active().filter(key_hash=hash_token(raw)).first()
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


# --- trust ----------------------------------------------------------------------------------------
def account_hub_trusted(*, user: AbstractBaseUser | AnonymousUser | None) -> bool:
    """Whether ``user`` may name any hub model or dataset, not only the operator's allow-list
    (``FINETUNE_HUB_MODELS`` / ``FINETUNE_HUB_DATASETS``, checked in :mod:`tasks.paths`).

    Staff are trusted (they are the operators: they can tick the flag for themselves anyway); anyone
    else only when staff ticked ``Account.hub_trusted`` on their user page. Superuser status alone
    does not count, and a user without an ``Account`` row is not trusted.
    """
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if getattr(user, "is_staff", False):
        return True
    return Account.objects.filter(user_id=user.pk, hub_trusted=True).exists()


def account_set_hub_trusted(*, user: AbstractBaseUser, trusted: bool) -> Account:
    """Mark ``user`` trusted with any hub id, or take it back (the admin's user page does the same)."""
    account, _created = Account.objects.update_or_create(user=user, defaults={"hub_trusted": trusted})
    return account

"""Everything that changes accounts and tokens, and what they allow."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Q
from django.utils import timezone

from accounts.models import Account, ApiToken, Quota, QuotaScope, generate_token, hash_token


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


# --- quotas ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """A user's quotas as resolved (``None``: no limit). Field names are ``accounts.Quota``'s."""

    max_waiting_tasks: int | None = None
    max_gpus: int | None = None
    gpu_hours_per_week: float | None = None
    max_deployments: int | None = None
    max_storage_gb: float | None = None

    @property
    def max_storage_bytes(self) -> int | None:
        return None if self.max_storage_gb is None else int(self.max_storage_gb * 10**9)


LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))


def _fallback() -> dict[str, Any]:
    """What applies when no quota row sets a limit: only the waiting-task cap is on by default."""
    return {"max_waiting_tasks": settings.FINETUNE_DEFAULT_MAX_WAITING_TASKS or None}


def quota_limits_for(*, user_ids: list[int] | set[int]) -> dict[int, Limits]:
    """The resolved limits of each user in ``user_ids``, in three queries whatever their number.

    Field by field: the user's own row; else the most generous value of the user's groups' rows;
    else the default row; else the setting. Group and default rows (and the setting) do not bind
    staff; a staff user's own row does (see :class:`accounts.models.Quota`)."""
    ids = set(user_ids)
    if not ids:
        return {}
    users = dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "is_staff"))
    rows = list(Quota.objects.filter(Q(user_id__in=ids) | Q(scope=QuotaScope.DEFAULT) | Q(group__user__in=ids))
                .distinct())
    own = {q.user_id: q for q in rows if q.scope == QuotaScope.USER}
    default = next((q for q in rows if q.scope == QuotaScope.DEFAULT), None)
    group_quotas = {q.group_id: q for q in rows if q.scope == QuotaScope.GROUP}
    memberships: dict[int, list[int]] = {}
    if group_quotas:
        through = get_user_model().groups.through
        for user_id, group_id in through.objects.filter(user_id__in=ids, group_id__in=group_quotas).values_list(
            "user_id", "group_id"
        ):
            memberships.setdefault(user_id, []).append(group_id)
    fallback = _fallback()
    resolved: dict[int, Limits] = {}
    for user_id in ids:
        staff = users.get(user_id, False)
        values: dict[str, Any] = {}
        for name in LIMIT_NAMES:
            mine = getattr(own[user_id], name) if user_id in own else None
            if mine is not None or staff:
                values[name] = mine
                continue
            from_groups = [getattr(group_quotas[g], name) for g in memberships.get(user_id, [])]
            from_groups = [v for v in from_groups if v is not None]
            if from_groups:
                values[name] = max(from_groups)
            elif default is not None and getattr(default, name) is not None:
                values[name] = getattr(default, name)
            else:
                values[name] = fallback.get(name)
        resolved[user_id] = Limits(**values)
    return resolved


def quota_limits(*, user: AbstractBaseUser) -> Limits:
    """The resolved limits of one user (:func:`quota_limits_for`)."""
    return quota_limits_for(user_ids=[user.pk])[user.pk]

"""Named, hashed API tokens: one per script or notebook, revocable one by one."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from core.ownership import OwnedQuerySet

TOKEN_PREFIX = "ftp_"


def hash_token(raw: str) -> str:
    # Tokens are 256 random bits, so a plain SHA-256 is enough (no slow KDF needed, unlike passwords).
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class ApiTokenQuerySet(OwnedQuerySet):
    owner_field = "user"

    def active(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiToken(models.Model):
    """An API token. Only its SHA-256 is stored; the token itself is shown once, at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(_("name"), max_length=100)
    key_hash = models.CharField(max_length=64, unique=True)
    key_prefix = models.CharField(_("starts with"), max_length=16)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class Account(models.Model):
    """What the platform knows about a user beyond Django's ``User``: what staff let them do.

    A row is created when staff first change something (the admin's user page); a user without one
    has the defaults. Read it through :func:`accounts.services.account_hub_trusted`, never directly.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="account")
    hub_trusted = models.BooleanField(
        _("trusted with any hub id"),
        default=False,
        help_text=_(
            "swift runs the Python code a hub model or dataset ships with. Tick this to let the user name any "
            "hub model or dataset, not only those matching FINETUNE_HUB_MODELS / FINETUNE_HUB_DATASETS: "
            "only for people you would give a shell on the GPU hosts. Staff are always trusted."
        ),
    )

    class Meta:
        verbose_name = _("account")

    def __str__(self) -> str:
        return f"account of {self.user}"

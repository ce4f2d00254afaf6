"""Named, hashed API tokens: one per script or notebook, revocable one by one."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
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


class QuotaScope(models.TextChoices):
    USER = "user", _("One user")
    GROUP = "group", _("A group")
    DEFAULT = "default", _("Everyone (the default)")


class Quota(models.Model):
    """Limits staff set on what users may hold (issue 12; Kubernetes' ResourceQuota is the model).

    A row applies to one user, to the members of one group, or to everyone (the one ``default``
    row). Each limit is resolved on its own, field by field (``accounts.services.quota_limits``):
    the user's own row if it sets that limit, else the most generous value any of the user's groups
    sets, else the default row, else the setting (``FINETUNE_DEFAULT_MAX_WAITING_TASKS`` for waiting
    tasks; the other limits are off). An empty field sets nothing at that level. Group and default
    rows do not bind staff; a staff user's own row does.
    """

    scope = models.CharField(_("applies to"), max_length=8, choices=QuotaScope.choices, default=QuotaScope.USER)
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True,
                                related_name="quota")
    group = models.OneToOneField("auth.Group", on_delete=models.CASCADE, null=True, blank=True, related_name="quota")
    max_waiting_tasks = models.PositiveIntegerField(
        _("max waiting tasks"), null=True, blank=True,
        help_text=_("Tasks that have not started yet (waiting, held or handed to a worker)."),
    )
    max_gpus = models.PositiveSmallIntegerField(
        _("max GPUs held at once"), null=True, blank=True,
        help_text=_("GPUs held by the user's running tasks, exports and deployments together."),
    )
    gpu_hours_per_week = models.FloatField(
        _("GPU-hours per rolling week"), null=True, blank=True,
        help_text=_("Over the last 7 days; once used up, new work waits (running work is not stopped)."),
    )
    max_deployments = models.PositiveSmallIntegerField(
        _("max running deployments"), null=True, blank=True,
        help_text=_("Deployments starting or serving at once."),
    )
    max_storage_gb = models.FloatField(
        _("storage (GB)"), null=True, blank=True,
        help_text=_("Datasets and task outputs (checkpoints, merged models, logs), in GB (10⁹ bytes)."),
    )
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("quota")
        ordering = ["scope", "id"]
        constraints = [
            models.UniqueConstraint(fields=["scope"], condition=models.Q(scope="default"), name="one_default_quota"),
            models.CheckConstraint(
                condition=(
                    models.Q(scope="user", user__isnull=False, group__isnull=True)
                    | models.Q(scope="group", user__isnull=True, group__isnull=False)
                    | models.Q(scope="default", user__isnull=True, group__isnull=True)
                ),
                name="quota_scope_matches",
            ),
            models.CheckConstraint(condition=models.Q(gpu_hours_per_week__gte=0), name="quota_gpu_hours_not_negative"),
            models.CheckConstraint(condition=models.Q(max_storage_gb__gte=0), name="quota_storage_not_negative"),
        ]

    def __str__(self) -> str:
        if self.scope == QuotaScope.USER:
            return f"quota of {self.user}"
        if self.scope == QuotaScope.GROUP:
            return f"quota of group {self.group}"
        return "default quota"

    def clean(self) -> None:
        """The admin's form: the row names exactly what its scope says."""
        if self.scope == QuotaScope.USER and (self.user_id is None or self.group_id is not None):
            raise ValidationError({"user": _("A quota for one user names that user (and no group).")})
        if self.scope == QuotaScope.GROUP and (self.group_id is None or self.user_id is not None):
            raise ValidationError({"group": _("A quota for a group names that group (and no user).")})
        if self.scope == QuotaScope.DEFAULT and (self.user_id is not None or self.group_id is not None):
            raise ValidationError({"scope": _("The default quota applies to everyone: leave user and group empty.")})

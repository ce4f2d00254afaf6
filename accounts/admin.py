from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import AbstractUser
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import Account, ApiToken, Quota
from accounts.services import api_token_revoke

User = get_user_model()


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "key_prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "user__username", "key_prefix"]
    readonly_fields = ["user", "key_prefix", "key_hash", "created_at", "last_used_at", "revoked_at"]
    list_select_related = ["user"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a token is only useful to the person who sees it once: created via the API or profile

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset:
            api_token_revoke(token=token)
        messages.success(request, f"Revoked {queryset.count()} token(s).")


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    """Every account that staff changed; a user is edited on their user page (the inline below)."""

    list_display = ["user", "hub_trusted"]
    list_filter = ["hub_trusted"]
    search_fields = ["user__username", "user__email"]
    readonly_fields = ["user"]
    list_select_related = ["user"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # created from the user page, where the user is chosen


class AccountInline(admin.StackedInline):
    """The platform's own fields on Django's user page (docs/security.md, "Code from the hub")."""

    model = Account
    can_delete = False
    fields = ["hub_trusted"]
    verbose_name_plural = "platform account"


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Quotas (docs/operations.md, "Quotas and fair share"): one row for everyone (the default), rows
    for groups (a member gets the most generous group value) and rows for single users (theirs wins).
    An empty limit sets nothing at that level."""

    list_display = ["__str__", "scope", "max_waiting_tasks", "max_gpus", "gpu_hours_per_week", "max_deployments",
                    "max_storage_gb", "updated_at"]
    list_filter = ["scope"]
    search_fields = ["user__username", "group__name"]
    list_select_related = ["user", "group"]
    autocomplete_fields = ["user"]
    fieldsets = [
        (None, {"fields": ["scope", "user", "group"]}),
        ("Limits (empty: not set here)", {"fields": ["max_waiting_tasks", "max_gpus", "gpu_hours_per_week",
                                                     "max_deployments", "max_storage_gb"]}),
    ]


class QuotaInline(admin.StackedInline):
    """The user's own quota on their user page (it wins over group and default rows)."""

    model = Quota
    fk_name = "user"
    can_delete = True
    extra = 0
    max_num = 1
    fields = ["max_waiting_tasks", "max_gpus", "gpu_hours_per_week", "max_deployments", "max_storage_gb"]
    verbose_name_plural = "quota of this user (empty: the group or default quota applies)"


class PlatformUserAdmin(UserAdmin):
    """Django's user admin with the platform's account fields and quota inline."""

    inlines = [*UserAdmin.inlines, AccountInline, QuotaInline]
    list_display = [*UserAdmin.list_display, "hub_trusted"]
    list_filter = [*UserAdmin.list_filter, "account__hub_trusted"]
    list_select_related = ["account"]

    @admin.display(boolean=True, description="trusted with any hub id")
    def hub_trusted(self, user: AbstractUser) -> bool:
        account = getattr(user, "account", None)
        return bool(user.is_staff or (account is not None and account.hub_trusted))


if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, PlatformUserAdmin)

"""No tables of its own: usage is read from the runs, tasks and quotas of the apps below. One proxy
of the user model gives the admin its read-only "Usage by user" report (``usage.admin``)."""

from django.contrib.auth import get_user_model
from django.utils.translation import gettext_lazy as _


class UserUsage(get_user_model()):  # type: ignore[misc]
    """A user seen through their usage (admin report only; no table, no new permission needed)."""

    class Meta:
        proxy = True
        verbose_name = _("usage by user")
        verbose_name_plural = _("usage by user")

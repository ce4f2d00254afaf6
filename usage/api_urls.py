"""``/api/usage/``: the usage report API (:mod:`usage.api`)."""

from django.urls import path

from usage.api import UsageUsersView, UsageView

urlpatterns = [
    path("", UsageView.as_view(), name="api-usage"),
    path("users/", UsageUsersView.as_view(), name="api-usage-users"),
]

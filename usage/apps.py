from django.apps import AppConfig


class UsageConfig(AppConfig):
    """Usage accounting and quotas as users and staff see them (issue 12): the pages, the API and the
    admin's usage report. It reads every app below it and changes nothing."""

    name = "usage"
    verbose_name = "Usage"

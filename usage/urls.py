"""Pages of the usage app, mounted at ``/usage/``."""

from django.urls import path

from usage import views

app_name = "usage"

urlpatterns = [
    path("", views.usage_mine, name="mine"),
    path("all/", views.usage_all, name="all"),
]

"""Pages of the deployments (mounted at /deployments/)."""

from django.urls import path

from deployments import views

urlpatterns = [
    path("", views.deployment_list, name="deployments"),
    path("<int:pk>/", views.deployment_detail, name="deployment_detail"),
    path("<int:pk>/stop/", views.deployment_stop, name="deployment_stop"),
    path("<int:pk>/delete/", views.deployment_delete, name="deployment_delete"),
    path("<int:pk>/chat/", views.playground_chat, name="deployment_chat"),
]

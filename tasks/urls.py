"""Pages of the portal (issue #4). ``/gpus/``, ``/queue/`` and ``/deployments/`` are placeholders
until the GPU scheduler and deployments replace them."""

from django.urls import path

from tasks import views

urlpatterns = [
    path("", views.home, name="home"),
    path("tasks/", views.task_list, name="task_list"),
    path("tasks/new/", views.task_create, name="task_new"),
    path("tasks/<int:pk>/", views.task_detail, name="task_detail"),
    path("tasks/<int:pk>/stop/", views.task_stop, name="task_stop"),
    path("tasks/<int:pk>/delete/", views.task_delete, name="task_delete"),
    path("datasets/", views.dataset_list, name="dataset_list"),
    path("datasets/new/", views.dataset_upload, name="dataset_upload"),
    path("datasets/<int:pk>/delete/", views.dataset_delete, name="dataset_delete"),
    path("gpus/", views.gpu_list, name="gpus"),
    path("queue/", views.queue, name="queue"),
    path("deployments/", views.deployment_list, name="deployments"),
]

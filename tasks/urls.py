"""Pages of the portal: tasks, datasets and the queue. The GPUs page lives in ``gpus.urls``, the
deployment pages in ``deployments.urls``."""

from django.urls import path

from tasks import views

urlpatterns = [
    path("", views.home, name="home"),
    path("tasks/", views.task_list, name="task_list"),
    path("tasks/new/", views.task_create, name="task_new"),
    path("tasks/<int:pk>/", views.task_detail, name="task_detail"),
    path("tasks/<int:pk>/cards/", views.task_cards, name="task_cards"),
    path("tasks/<int:pk>/stop/", views.task_stop, name="task_stop"),
    path("tasks/<int:pk>/resume/", views.task_resume, name="task_resume"),
    path("tasks/<int:pk>/export/", views.task_export, name="task_export"),
    path("tasks/<int:pk>/delete/", views.task_delete, name="task_delete"),
    path("tasks/<int:pk>/outputs/delete/", views.task_outputs_delete, name="task_outputs_delete"),
    path("datasets/", views.dataset_list, name="dataset_list"),
    path("datasets/new/", views.dataset_upload, name="dataset_upload"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset_detail"),
    path("datasets/<int:pk>/delete/", views.dataset_delete, name="dataset_delete"),
    path("queue/", views.queue, name="queue"),
    path("queue/<int:pk>/priority/", views.queue_priority, name="queue_priority"),
    path("queue/<int:pk>/hold/", views.queue_hold, name="queue_hold"),
    path("queue/<int:pk>/release/", views.queue_release, name="queue_release"),
    path("queue/<int:pk>/cancel/", views.queue_cancel, name="queue_cancel"),
]

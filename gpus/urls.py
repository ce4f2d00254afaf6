"""Pages of the compute: the GPUs (``/gpus/``) and the queue of waiting tasks (``/queue/``)."""

from django.urls import path

from gpus import views

urlpatterns = [
    path("gpus/", views.gpu_list, name="gpus"),
    path("gpus/<int:pk>/enable/", views.gpu_enable, name="gpu_enable"),
    path("gpus/<int:pk>/disable/", views.gpu_disable, name="gpu_disable"),
    path("queue/", views.queue, name="queue"),
    path("queue/<int:pk>/priority/", views.queue_priority, name="queue_priority"),
    path("queue/<int:pk>/hold/", views.queue_hold, name="queue_hold"),
    path("queue/<int:pk>/release/", views.queue_release, name="queue_release"),
    path("queue/<int:pk>/cancel/", views.queue_cancel, name="queue_cancel"),
]

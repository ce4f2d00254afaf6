"""Pages of the compute layer: the GPUs (``/gpus/``)."""

from django.urls import path

from gpus import views

urlpatterns = [
    path("gpus/", views.gpu_list, name="gpus"),
    path("gpus/<int:pk>/enable/", views.gpu_enable, name="gpu_enable"),
    path("gpus/<int:pk>/disable/", views.gpu_disable, name="gpu_disable"),
]

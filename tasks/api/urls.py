from django.urls import include, path
from rest_framework.routers import DefaultRouter

from tasks.api.views import (
    DatasetViewSet,
    ExportViewSet,
    PresetListView,
    QueueView,
    TaskViewSet,
    TrainingArgsView,
)

# No "<route>.json" routes: the schema has none, and they passed format= to views that take no such argument.
router = DefaultRouter(trailing_slash=True)
router.include_format_suffixes = False
router.register("tasks", TaskViewSet, basename="task")
router.register("datasets", DatasetViewSet, basename="dataset")
router.register("exports", ExportViewSet, basename="export")

urlpatterns = [
    path("queue/", QueueView.as_view(), name="api-queue"),
    path("presets/", PresetListView.as_view(), name="preset-list"),
    path("training-args/", TrainingArgsView.as_view(), name="training-args"),
    path("", include(router.urls)),
]

from rest_framework.routers import DefaultRouter

from gpus.api.views import GpuViewSet

# No "<route>.json" routes: the schema has none, and they passed format= to views that take no such argument.
router = DefaultRouter(trailing_slash=True)
router.include_format_suffixes = False
router.register("", GpuViewSet, basename="gpu")
urlpatterns = router.urls

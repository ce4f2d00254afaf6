from rest_framework.routers import DefaultRouter

from gpus.api.views import GpuViewSet

router = DefaultRouter(trailing_slash=True)
router.register("", GpuViewSet, basename="gpu")
urlpatterns = router.urls

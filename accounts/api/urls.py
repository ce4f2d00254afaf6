from django.urls import include, path
from rest_framework.routers import DefaultRouter

from accounts.api.views import ApiTokenViewSet, TokenObtainView

router = DefaultRouter(trailing_slash=True)
router.register("tokens", ApiTokenViewSet, basename="api-token")

urlpatterns = [
    path("token/", TokenObtainView.as_view(), name="api-token-obtain"),
    path("", include(router.urls)),
]

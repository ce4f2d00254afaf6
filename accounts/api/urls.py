from django.urls import include, path
from rest_framework.routers import DefaultRouter

from accounts.api.views import ApiTokenViewSet, TokenObtainView

# No "<route>.json" routes: the schema has none, and they passed format= to views that take no such argument.
router = DefaultRouter(trailing_slash=True)
router.include_format_suffixes = False
router.register("tokens", ApiTokenViewSet, basename="api-token")

urlpatterns = [
    path("token/", TokenObtainView.as_view(), name="api-token-obtain"),
    path("", include(router.urls)),
]

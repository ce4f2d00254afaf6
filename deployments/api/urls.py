from django.urls import include, path
from rest_framework.routers import SimpleRouter

from deployments import gateway
from deployments.api.views import DeploymentOptionsView, DeploymentViewSet

router = SimpleRouter(trailing_slash=True)
router.register("", DeploymentViewSet, basename="deployment")

urlpatterns = [
    path("options/", DeploymentOptionsView.as_view(), name="deployment-options"),
    # The OpenAI-compatible gateway (token auth, async): base_url = /api/deployments/<id>/v1
    path("<int:pk>/v1/models", gateway.models, name="deployment-gateway-models"),
    path("<int:pk>/v1/chat/completions", gateway.chat_completions, name="deployment-gateway-chat"),
    path("", include(router.urls)),
]

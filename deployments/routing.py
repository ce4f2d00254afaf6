"""WebSocket routes of the deployments app (see ``deployments.consumers``)."""

from django.urls import path

from deployments import consumers

websocket_urlpatterns = [
    path("ws/deployments/", consumers.DeploymentListConsumer.as_asgi(), name="ws-deployments"),
    path("ws/deployments/<int:deployment_id>/", consumers.DeploymentConsumer.as_asgi(), name="ws-deployment"),
]

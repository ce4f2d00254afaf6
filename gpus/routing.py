"""WebSocket routes of the gpus app (see ``gpus.consumers``)."""

from django.urls import path

from gpus import consumers

websocket_urlpatterns = [
    path("ws/gpus/", consumers.GpuQueueConsumer.as_asgi(), name="ws-gpus"),
]

"""WebSocket routes of every app, mounted by ``finetune_platform.asgi`` behind the origin check and
the session auth middleware."""

from django.urls import URLPattern

from deployments.routing import websocket_urlpatterns as deployment_routes
from gpus.routing import websocket_urlpatterns as gpu_routes
from tasks.routing import websocket_urlpatterns as task_routes

websocket_urlpatterns: list[URLPattern] = [*task_routes, *gpu_routes, *deployment_routes]

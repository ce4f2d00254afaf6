"""WebSocket routes of every app (consumers arrive with the live pages, issue #4)."""

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []

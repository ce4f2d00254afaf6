"""WebSocket routes of the tasks app (see ``tasks.consumers``)."""

from django.urls import path

from tasks import consumers

websocket_urlpatterns = [
    path("ws/tasks/", consumers.TaskListConsumer.as_asgi(), name="ws-task-list"),
    path("ws/tasks/<int:task_id>/", consumers.TaskConsumer.as_asgi(), name="ws-task"),
    path("ws/queue/", consumers.QueueConsumer.as_asgi(), name="ws-queue"),
]

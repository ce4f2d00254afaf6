"""The seed-compatible calls, mounted at ``/finetuning/``."""

from django.urls import path

from tasks.api import compat

urlpatterns = [
    path("createTask", compat.create_task, name="seed-create-task"),
    path("deleteTask", compat.delete_task, name="seed-delete-task"),
    path("stopTask", compat.stop_task, name="seed-stop-task"),
    path("getTask", compat.get_task, name="seed-get-task"),
    path("getTaskList", compat.get_task_list, name="seed-get-task-list"),
    path("getTaskLog", compat.get_task_log, name="seed-get-task-log"),
]

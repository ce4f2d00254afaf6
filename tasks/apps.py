from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Fine-tuning tasks"

    def ready(self) -> None:
        # Register this app's kinds of run with the compute layer (gpus.workloads).
        import tasks.workloads  # noqa: F401

from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    name = "deployments"
    verbose_name = "Deployments"

    def ready(self) -> None:
        # Register this app's kinds of run with the compute layer (gpus.workloads).
        import deployments.workload  # noqa: F401

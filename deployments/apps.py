from django.apps import AppConfig

from tasks.outputs import register_output_guard


class DeploymentsConfig(AppConfig):
    name = "deployments"
    verbose_name = "Deployments"

    def ready(self) -> None:
        # Register this app's kinds of run with the compute layer (gpus.workloads).
        import deployments.workload  # noqa: F401
        from deployments.selectors import task_outputs_guard

        # A task's outputs are not deleted while a deployment serves one of its checkpoints.
        register_output_guard(task_outputs_guard)

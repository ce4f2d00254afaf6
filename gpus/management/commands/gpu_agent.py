"""``manage.py gpu_agent``: keep this host's GPU inventory current (NVML or the fake backend)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gpus.agent import announce_once, run_forever
from gpus.services import HostNameInUse, WorkerIdentity, host_claim, host_release


class Command(BaseCommand):
    help = "Discover this host's GPUs and refresh them every few seconds."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="One discovery, then exit.")
        parser.add_argument("--parent", type=int, default=None, help="Exit when this process is gone.")
        parser.add_argument("--instance", default=None,
                            help="The worker instance that holds this host name (set by manage.py worker).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            announce_once(instance=options["instance"])
            return
        if options["instance"]:
            run_forever(parent_pid=options["parent"], instance=options["instance"])
            return
        # On its own, the agent holds the host name like a worker does.
        me = WorkerIdentity()
        try:
            host_claim(name=settings.FINETUNE_HOST, me=me)
        except HostNameInUse as exc:
            raise CommandError(str(exc)) from None
        try:
            run_forever(parent_pid=options["parent"], instance=me.instance)
        finally:
            host_release(name=settings.FINETUNE_HOST, instance=me.instance)

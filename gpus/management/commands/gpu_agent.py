"""``manage.py gpu_agent``: keep this host's GPU inventory current (NVML or the fake backend)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gpus.agent import announce_once, run_forever


class Command(BaseCommand):
    help = "Discover this host's GPUs and refresh them every few seconds."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="One discovery, then exit.")
        parser.add_argument("--parent", type=int, default=None, help="Exit when this process is gone.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            announce_once()
            return
        run_forever(parent_pid=options["parent"])

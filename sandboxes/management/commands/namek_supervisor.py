"""Run the one process that owns local sandboxes (``make run`` starts it for you)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from namek_web.env import parse_screen_size
from sandboxes import runs, services
from sandboxes.local.supervisor import Supervisor, SupervisorError, isolation_problem


class Command(BaseCommand):
    help = "Run the local sandbox supervisor until SIGINT or SIGTERM."

    def handle(self, *args: Any, **options: Any) -> None:
        isolation = settings.NAMEK_LOCAL_ISOLATION == "on"
        if isolation:
            problem = isolation_problem()
            if problem:
                raise CommandError(
                    f"cannot isolate local sandboxes: {problem}. Install bubblewrap and allow "
                    "namespaces, or set NAMEK_LOCAL_ISOLATION=off to run sandboxes without "
                    "isolation (their pages and shells can then reach this machine)."
                )
        try:
            asyncio.run(self.serve(isolation))
        except SupervisorError as exc:
            raise CommandError(str(exc)) from None

    async def serve(self, isolation: bool) -> None:
        record = sync_to_async(services.record_phase)
        supervisor = Supervisor(
            settings.DATA_DIR,
            settings.NAMEK_SUPERVISOR_SOCKET,
            settings.NAMEK_INTERNAL_URL,
            isolation=isolation,
            chromium=settings.NAMEK_CHROMIUM,
            start_timeout=settings.NAMEK_SANDBOX_START_TIMEOUT,
            on_phase=record,
            screen_server=settings.NAMEK_SCREEN,
            warm_pool=settings.NAMEK_WARM_POOL,
            warm_size=parse_screen_size(settings.NAMEK_SCREEN_SIZE) or (1280, 800),
            on_runner_exit=sync_to_async(runs.runner_exited),
        )
        await supervisor.start()
        # Whatever the database still believes is alive died with the previous supervisor.
        orphans = await sync_to_async(services.mark_orphans_failed)("local", "Namek restarted")
        if orphans:
            self.stderr.write(f"marked {orphans} sandboxes of an earlier run as failed")
        reaper = asyncio.ensure_future(self.reap())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        self.stdout.write(f"sandbox supervisor ready on {settings.NAMEK_SUPERVISOR_SOCKET}")
        self.stdout.flush()
        await stop.wait()
        reaper.cancel()
        await supervisor.stop()

    async def reap(self) -> None:
        """Stop sandboxes that are idle or too old (services.reap says which, and why)."""
        while True:
            await asyncio.sleep(settings.NAMEK_REAPER_INTERVAL)
            try:
                for sandbox_id, reason in await sync_to_async(services.reap, thread_sensitive=False)():
                    self.stderr.write(f"sandbox {sandbox_id} {reason}")
            except Exception:
                logging.getLogger(__name__).exception("reaping sandboxes failed")

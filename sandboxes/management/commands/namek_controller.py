"""Follow Kubernetes sandboxes into Namek's database: the one controller process of a cluster.

Run it as a single replica (``manage.py namek_controller``) beside the web replicas when
``NAMEK_BACKEND=kubernetes``. It does what the local supervisor does for local sandboxes:

- follows the phases of every Namek SandboxClaim (``KubernetesBackend.follow``: watches
  that resume from their resourceVersion) into ``services.record_phase``, passing through
  ``starting`` on the way to ``ready`` as the transitions require;
- deletes the claim of a sandbox it marks failed, so that its pod does not linger, and the
  claim of any sandbox Namek already counts as stopped or failed (a delete that could not
  reach the API is recorded as stopped all the same);
- after every full listing, marks stopped the live sandboxes whose claim vanished while
  nobody watched (older than ``VANISHED_GRACE``: a sandbox being created has none yet);
- records Chromium container restarts on the sandbox;
- stops idle and too old sandboxes every ``NAMEK_REAPER_INTERVAL`` (``services.reap``).
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections
from django.utils import timezone

from sandboxes import services
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import LIVE_PHASES, Phase, Sandbox

log = logging.getLogger(__name__)

#: a sandbox this young may not have its claim yet
VANISHED_GRACE = timedelta(seconds=60)
#: the phases recorded on the way to each phase the backend reports
PATH = {
    Phase.PENDING: (),
    Phase.STARTING: (Phase.STARTING,),
    Phase.READY: (Phase.STARTING, Phase.READY),
    Phase.FAILED: (Phase.FAILED,),
    Phase.STOPPED: (Phase.STOPPED,),
}


class Command(BaseCommand):
    help = "Follow Kubernetes sandboxes into Namek's database and stop idle or too old ones (run one replica)."

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.NAMEK_BACKEND != "kubernetes":
            raise CommandError(f"NAMEK_BACKEND is {settings.NAMEK_BACKEND!r}: this command serves kubernetes only")
        self.backend: Any = get_backend("kubernetes")
        try:
            self.backend.check()
        except BackendError as exc:
            if not exc.retryable:
                raise CommandError(str(exc)) from None
            log.warning("the Kubernetes API does not answer yet (%s): following anyway", exc)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, frame: stop.set())
        reaper = threading.Thread(target=self.reap, args=(stop,), name="namek-reaper", daemon=True)
        reaper.start()
        self.stdout.write(
            f"following sandboxes in namespace {self.backend.namespace} (warm pool {self.backend.warm_pool})"
        )
        self.stdout.flush()
        try:
            self.backend.follow(
                self.on_phase,
                stop,
                on_sync=self.on_sync,
                on_browser_restart=self.on_browser_restart,
                was_ready=self.was_ready,
            )
        except BackendError as exc:
            raise CommandError(str(exc)) from None
        finally:
            stop.set()

    def on_phase(self, sandbox_id: int, phase: str, reason: str) -> None:
        close_old_connections()
        waiting = Sandbox.objects.filter(pk=sandbox_id, phase__in=(Phase.PENDING, Phase.STARTING))
        if phase == Phase.READY and waiting.exists():
            # A warm pod shows about:blank: its start page first, then "ready".
            services.record_phase(sandbox_id, Phase.STARTING)
            try:
                self.backend.open_start_page(sandbox_id)  # type: ignore[attr-defined]
            except BackendError as exc:
                log.warning("sandbox %s: %s (trying again)", sandbox_id, exc)
                return
        for step in PATH.get(phase, ()):
            changed = services.record_phase(sandbox_id, step, reason if step == phase else "")
            if changed and step == Phase.FAILED:
                log.warning("sandbox %s failed: %s", sandbox_id, reason)
        if phase != Phase.STOPPED:
            ended = Sandbox.objects.filter(pk=sandbox_id, phase__in=(Phase.STOPPED, Phase.FAILED)).exists()
            if ended:
                # As the local supervisor tears a failed sandbox down: nothing is left running.
                self.delete_claim(sandbox_id)

    def delete_claim(self, sandbox_id: int) -> None:
        try:
            self.backend.delete(sandbox_id)
        except BackendError as exc:
            log.warning("deleting the claim of ended sandbox %s: %s", sandbox_id, exc)

    def on_sync(self, present: set[int]) -> None:
        """Live sandboxes whose claim is not there any more stopped while nobody watched."""
        close_old_connections()
        cutoff = timezone.now() - VANISHED_GRACE
        vanished = (
            Sandbox.objects.filter(backend="kubernetes", phase__in=LIVE_PHASES, created_at__lt=cutoff)
            .exclude(pk__in=present)
            .values_list("pk", flat=True)
        )
        for sandbox_id in list(vanished):
            reason = f"deleted: its SandboxClaim namek-{sandbox_id} vanished"
            if services.record_phase(sandbox_id, Phase.STOPPED, reason):
                self.stderr.write(f"sandbox {sandbox_id} {reason}")
        ended = Sandbox.objects.filter(backend="kubernetes", pk__in=present, phase__in=(Phase.STOPPED, Phase.FAILED))
        for sandbox_id in list(ended.values_list("pk", flat=True)):
            self.delete_claim(sandbox_id)

    def was_ready(self, sandbox_id: int) -> bool:
        """Whether the sandbox was ready before (its start deadline is then behind it)."""
        close_old_connections()
        return Sandbox.objects.filter(pk=sandbox_id, ready_at__isnull=False).exists()

    def on_browser_restart(self, sandbox_id: int, restarts: int, why: str) -> None:
        close_old_connections()
        phase = Sandbox.objects.filter(pk=sandbox_id).values_list("phase", flat=True).first()
        if phase is not None:
            services.record_phase(sandbox_id, phase, extra={"browser_exit": why, "browser_restarts": restarts})

    def reap(self, stop: threading.Event) -> None:
        """Stop sandboxes that are idle or too old (services.reap says which, and why)."""
        while not stop.wait(settings.NAMEK_REAPER_INTERVAL):
            try:
                close_old_connections()
                for sandbox_id, reason in services.reap():
                    self.stderr.write(f"sandbox {sandbox_id} {reason}")
            except Exception:
                log.exception("reaping sandboxes failed")

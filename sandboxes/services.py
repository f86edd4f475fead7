"""Sandbox lifecycle: every phase change goes through here, is stored, then broadcast."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.core.exceptions import ObjectDoesNotExist
from django.db import transaction
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from namek_web.env import parse_screen_size
from sandboxes import control, events, runs
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError, SandboxSpec
from sandboxes.models import LIVE_PHASES, ControlLease, Phase, Sandbox

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "sandboxes"
START_PAGE_SALT = "namek.sandbox.start"

#: phase -> the phases it may be entered from
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    Phase.STARTING: (Phase.PENDING,),
    Phase.READY: (Phase.STARTING,),
    Phase.FAILED: (Phase.PENDING, Phase.STARTING, Phase.READY, Phase.STOPPING),
    Phase.STOPPING: (Phase.PENDING, Phase.STARTING, Phase.READY, Phase.FAILED),
    Phase.STOPPED: (Phase.PENDING, Phase.STARTING, Phase.READY, Phase.STOPPING, Phase.FAILED),
}


class SandboxRequestError(ValueError):
    """The request for a sandbox is invalid (a 400)."""


class SandboxStateError(Exception):
    """The sandbox is not in a phase that allows this (a 409)."""


class LimitReached(Exception):
    """A cap on sandboxes: ``status`` is 429 for the user's own cap, 503 for Namek's."""

    def __init__(self, message: str, status: int, limit: int) -> None:
        super().__init__(message)
        self.status = status
        self.limit = limit


def sandbox_json(sandbox: Sandbox) -> dict[str, Any]:
    return {
        "id": sandbox.pk,
        "name": sandbox.name,
        "owner": sandbox.owner.get_username(),
        "backend": sandbox.backend,
        "screen": sandbox.screen,
        "phase": sandbox.phase,
        "failure_reason": sandbox.failure_reason,
        "browser_restarts": sandbox.browser_restarts,
        "last_browser_exit": sandbox.last_browser_exit,
        "banner_color": sandbox.banner_color,
        "created_at": sandbox.created_at.isoformat(),
        "updated_at": sandbox.updated_at.isoformat(),
        "ready_at": sandbox.ready_at.isoformat() if sandbox.ready_at else None,
        "stopped_at": sandbox.stopped_at.isoformat() if sandbox.stopped_at else None,
        "last_event_seq": sandbox.event_seq,
        "url": reverse("sandbox", args=[sandbox.pk]),
        "screen_ws": f"/ws/sandboxes/{sandbox.pk}/screen/",
        "control": control.summary(_lease(sandbox)),
    }


def _lease(sandbox: Sandbox) -> ControlLease | None:
    try:
        return sandbox.lease
    except ObjectDoesNotExist:  # a sandbox made before leases, or in a test
        return None


def broadcast(sandbox: Sandbox) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "sandbox.changed", "owner_id": sandbox.owner_id, "sandbox": sandbox_json(sandbox)}
    try:
        async_to_sync(layer.group_send)(DASHBOARD_GROUP, message)
    except Exception:  # a dashboard update must never break a lifecycle change
        log.exception("broadcasting sandbox %s failed", sandbox.pk)


def start_page_token(sandbox_id: int) -> str:
    return signing.dumps(sandbox_id, salt=START_PAGE_SALT)


def sandbox_from_start_token(token: str) -> Sandbox | None:
    try:
        sandbox_id = signing.loads(token, salt=START_PAGE_SALT)
    except signing.BadSignature:
        return None
    return Sandbox.objects.filter(pk=sandbox_id).first()


def validate_request(name: Any, screen: Any) -> tuple[str, str]:
    if name is None:
        name = ""
    if not isinstance(name, str):
        raise SandboxRequestError("name: must be a string")
    name = name.strip()
    if len(name) > 64 or any(not ch.isprintable() for ch in name):
        raise SandboxRequestError("name: at most 64 printable characters")
    if screen is None:
        screen = settings.NAMEK_SCREEN_SIZE
    if not isinstance(screen, str) or parse_screen_size(screen) is None:
        raise SandboxRequestError("screen: must be a string WIDTHxHEIGHT, from 320x200 to 3840x2160")
    return name, screen


def create_sandbox(owner: Any, name: Any = None, screen: Any = None) -> Sandbox:
    """Store the sandbox and ask the backend to start it. Raises SandboxRequestError, BackendError."""
    name, screen = validate_request(name, screen)
    backend = get_backend()
    with transaction.atomic():
        # Serialises one user's creates (SQLite serialises every write anyway).
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        check_limits(owner)
        sandbox = Sandbox.objects.create(owner=owner, name=name or "sandbox", backend=backend.name, screen=screen)
        ControlLease.objects.create(sandbox=sandbox)
        if not name:
            sandbox.name = f"sandbox-{sandbox.pk}"
            sandbox.save(update_fields=["name"])
        data = {"name": sandbox.name, "screen": screen, "backend": backend.name}
        events.append(
            sandbox,
            events.NewEvent("sandbox.created", f"Created {sandbox.name} ({screen})", data, actor=owner.get_username()),
        )
    broadcast(sandbox)
    width, height = parse_screen_size(screen) or (0, 0)
    start_url = settings.NAMEK_INTERNAL_URL + reverse("sandbox-start", args=[start_page_token(sandbox.pk)])
    try:
        backend.create(SandboxSpec(sandbox.pk, sandbox.name, width, height, start_url))
    except BackendError as exc:
        record_phase(sandbox.pk, Phase.FAILED, f"could not create it: {exc}")
        raise
    sandbox.refresh_from_db()
    return sandbox


def check_limits(owner: Any) -> None:
    live = Sandbox.objects.filter(phase__in=LIVE_PHASES)
    per_user = settings.NAMEK_MAX_SANDBOXES_PER_USER
    if live.filter(owner=owner).count() >= per_user:
        message = f"you already have {per_user} sandboxes, the most one user may have: delete one"
        raise LimitReached(message, 429, per_user)
    total = settings.NAMEK_MAX_SANDBOXES
    if live.count() >= total:
        raise LimitReached(f"Namek runs its maximum of {total} sandboxes: try again later", 503, total)


def delete_sandbox(sandbox: Sandbox, reason: str = "", by: str = "") -> Sandbox:
    """Stop the sandbox and keep its row (phase stopped) so its history survives.

    ``by`` is the user who asked; ``reason`` says why when it was not a person's wish
    (idle, too old).
    """
    if sandbox.phase == Phase.STOPPED:
        return sandbox
    if reason:
        log.info("stopping sandbox %s: %s", sandbox.pk, reason)
    record_phase(sandbox.pk, Phase.STOPPING, reason, by=by)
    try:
        get_backend(sandbox.backend).delete(sandbox.pk)
    except BackendError as exc:
        if not exc.retryable:
            raise
        # The supervisor is gone, and its sandboxes with it (they die with it).
        log.warning("deleting sandbox %s: %s", sandbox.pk, exc)
    record_phase(sandbox.pk, Phase.STOPPED, reason)
    sandbox.refresh_from_db()
    return sandbox


def restart_browser(sandbox: Sandbox, who: str) -> Sandbox:
    """Restart the sandbox's Chromium; the reason is recorded on the sandbox."""
    if sandbox.phase != Phase.READY:
        raise SandboxStateError(f"the sandbox is {sandbox.phase}, not ready")
    get_backend(sandbox.backend).restart_browser(sandbox.pk, f"restarted by {who}")
    sandbox.refresh_from_db()
    return sandbox


def viewer_joined(sandbox_id: int) -> None:
    Sandbox.objects.filter(pk=sandbox_id).update(viewers=F("viewers") + 1, last_active_at=timezone.now())


def viewer_left(sandbox_id: int) -> None:
    Sandbox.objects.filter(pk=sandbox_id).update(viewers=F("viewers") - 1, last_active_at=timezone.now())


def reap(now: datetime | None = None) -> list[tuple[int, str]]:
    """Stop sandboxes past their maximum lifetime, or idle (nobody watching) too long."""
    now = now or timezone.now()
    lifetime = timedelta(seconds=settings.NAMEK_MAX_LIFETIME)
    idle = timedelta(seconds=settings.NAMEK_IDLE_TIMEOUT)
    stopped = []
    for sandbox in Sandbox.objects.filter(phase=Phase.READY).select_related("owner"):
        reason = ""
        if now - sandbox.created_at >= lifetime:
            reason = f"stopped: reached the maximum lifetime of {settings.NAMEK_MAX_LIFETIME:g} s"
        elif sandbox.viewers <= 0 and now - (sandbox.last_active_at or sandbox.ready_at or sandbox.created_at) >= idle:
            reason = f"stopped: nobody watched it for {settings.NAMEK_IDLE_TIMEOUT:g} s"
        if reason:
            try:
                delete_sandbox(sandbox, reason)
            except BackendError as exc:
                log.warning("could not stop sandbox %s (%s): %s", sandbox.pk, reason, exc)
                continue
            stopped.append((sandbox.pk, reason))
    return stopped


def record_phase(
    sandbox_id: int, phase: str, reason: str = "", extra: dict[str, Any] | None = None, by: str = ""
) -> bool:
    """Move a sandbox to ``phase`` if the transition is allowed; store it and its event,
    then broadcast. ``by``: the user who asked, if a person did.

    Returns whether anything changed. Called by web processes and by the supervisor.
    """
    extra = extra or {}
    with transaction.atomic():
        sandbox = Sandbox.objects.select_for_update().select_related("owner").filter(pk=sandbox_id).first()
        if sandbox is None:
            return False
        changed = False
        if phase != sandbox.phase and sandbox.phase in ALLOWED_FROM.get(phase, ()):
            sandbox.phase = phase
            now = timezone.now()
            if phase == Phase.FAILED or (phase == Phase.STOPPING and reason):
                # A stop's reason is known when it starts: the backend's own report of
                # the end (which may come first, without one) must not leave it blank.
                sandbox.failure_reason = reason
            if phase == Phase.READY:
                sandbox.ready_at = now
            if phase == Phase.STOPPED:
                sandbox.stopped_at = now
                if reason and not sandbox.failure_reason:
                    sandbox.failure_reason = reason
            changed = True
            _phase_event(sandbox, phase, reason, by)
        if phase == sandbox.phase == Phase.STOPPED and reason and not sandbox.failure_reason:
            # The backend may report the stop before the caller who knows why it stopped.
            sandbox.failure_reason = reason
            changed = True
        if "browser_exit" in extra:
            sandbox.last_browser_exit = str(extra["browser_exit"])
            sandbox.browser_restarts = int(extra.get("browser_restarts", sandbox.browser_restarts + 1))
            changed = True
            data = {"reason": sandbox.last_browser_exit, "restarts": sandbox.browser_restarts}
            text = f"Chromium restarted: {sandbox.last_browser_exit}"
            events.append(sandbox, events.NewEvent("sandbox.browser_restarted", text, data))
        if changed:
            sandbox.save()
    if changed:
        broadcast(sandbox)
        if sandbox.phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
            control.sandbox_ending(sandbox.pk)
            runs.end_runs_of(sandbox.pk, f"the sandbox is {sandbox.phase}" + (f": {reason}" if reason else ""))
    return changed


PHASE_TEXT = {
    Phase.STOPPING: "Stopping",
    Phase.STOPPED: "Stopped",
    Phase.FAILED: "Failed",
}


def _phase_event(sandbox: Sandbox, phase: str, reason: str, by: str) -> None:
    """The event of a phase change, added in the transaction that stores the change."""
    if phase == Phase.READY:
        seconds = round((sandbox.ready_at - sandbox.created_at).total_seconds(), 2) if sandbox.ready_at else None
        new = events.NewEvent("sandbox.ready", f"Ready after {seconds} s", {"seconds": seconds})
    elif phase in PHASE_TEXT:
        kind = f"sandbox.{phase}"
        text = PHASE_TEXT[phase] + (f": {reason}" if reason else f" (asked by {by})" if by else "")
        source = "person" if by else "system"
        new = events.NewEvent(kind, text, {"reason": reason}, source=source, actor=by)
    else:
        return
    events.append(sandbox, new)


def mark_orphans_failed(backend: str, reason: str) -> int:
    """Sandboxes of ``backend`` that claim to be alive but whose processes are gone."""
    ids = list(Sandbox.objects.filter(backend=backend, phase__in=LIVE_PHASES).values_list("pk", flat=True))
    for sandbox_id in ids:
        record_phase(sandbox_id, Phase.FAILED, reason)
    return len(ids)

"""The control lease: who drives a sandbox — its agent run, one person, or nobody.

The lease (``ControlLease``, one row per sandbox) is changed only here, in a transaction
holding the sandbox's row and the lease's row, so two people racing get one winner; each
change bumps its ``version`` and is sent to the channel-layer group ``control-<id>``
(``control.changed`` with ``wire(lease)``), which every screen, terminal and CDP
connection of the sandbox joins, in every web process. The connections decide from it
whether their input reaches the sandbox (``viewer.consumers.control``).

Taking over (``take_over``): the lease goes to the person at once (``granted`` false,
"taking over"), the agent is told to pause, and once it says it is paused — or after
``NAMEK_TAKEOVER_PAUSE_TIMEOUT``, which the log records — ``granted`` turns true and the
person's connections become interactive. Handing back (``hand_back``) gives the lease
back to the agent run with a ``resume`` carrying the note, or to nobody. If every
connection of the holder has been gone for ``NAMEK_CONTROL_LAPSE`` (their connections
touch ``seen_at``), control lapses (``expire_lapsed``): to nobody, the agent stays
paused, and the page offers to resume it.

Every transition is an event: ``control.requested``, ``control.granted``,
``control.refused``, ``control.handed_back``, ``control.lapsed``; the span
(``ControlSpan``) keeps who, when, how long, how many inputs and the note.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from sandboxes import events, rfb
from sandboxes.access import can_use, is_admin
from sandboxes.backends import get_backend
from sandboxes.models import ControlLease, ControlSpan, Holder, Phase, RunStatus, Sandbox

log = logging.getLogger(__name__)

MAX_NOTE = 4000
#: how often a waiting take-over looks at the agent's status
PAUSE_POLL = 0.05
SCREENSHOT_TIMEOUT = 5.0
INPUT_KINDS = ("keys", "pointer", "clipboard", "terminal")


class ControlError(Exception):
    """A control request that cannot be granted; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def group_name(sandbox_id: int) -> str:
    return f"control-{sandbox_id}"


# --- reading -----------------------------------------------------------------------------


def lease_of(sandbox_id: int) -> ControlLease:
    """The sandbox's lease (created if a sandbox predates leases)."""
    lease = ControlLease.objects.select_related("user", "run").filter(sandbox_id=sandbox_id).first()
    if lease is None:
        with contextlib.suppress(IntegrityError), transaction.atomic():
            ControlLease.objects.create(sandbox_id=sandbox_id)
        lease = ControlLease.objects.select_related("user", "run").get(sandbox_id=sandbox_id)
    return lease


def _locked(sandbox_id: int) -> tuple[Sandbox, ControlLease]:
    """The sandbox and its lease, locked: call inside ``transaction.atomic``."""
    sandbox = Sandbox.objects.select_for_update().get(pk=sandbox_id)
    lease = ControlLease.objects.select_for_update().filter(sandbox_id=sandbox_id).first()
    if lease is None:
        lease = ControlLease.objects.create(sandbox_id=sandbox_id)
    return sandbox, lease


def wire(lease: ControlLease) -> dict[str, Any]:
    """What connections need to know: sent over the channel layer."""
    return {
        "sandbox": lease.sandbox_id,
        "version": lease.version,
        "holder": lease.holder,
        "user_id": lease.user_id,
        "granted": lease.granted,
        "span": lease.span_id,
        "run": lease.run_id,
    }


def holds(lease: dict[str, Any] | None, user_id: int | None) -> bool:
    """Whether the user drives (their input reaches the sandbox) under ``wire(lease)``."""
    return bool(
        lease is not None
        and user_id is not None
        and lease["holder"] == Holder.PERSON
        and lease["granted"]
        and lease["user_id"] == user_id
    )


def summary(lease: ControlLease | None) -> dict[str, Any]:
    """The state everyone may see (the dashboard's and the page's banner)."""
    if lease is None:
        return {"state": "nobody", "label": "Nobody is driving", "user": None, "run": None, "since": None}
    run = lease.run if lease.run_id else None
    run_status = run.status if run is not None else None
    name = lease.user.get_username() if lease.user_id and lease.user else "someone"
    if lease.holder == Holder.PERSON:
        state, label = ("person", f"{name} is driving") if lease.granted else ("pending", f"{name} is taking over…")
    elif run_status == RunStatus.PAUSED:
        state, label = "paused", "Paused"
    elif lease.holder == Holder.AGENT and run_status is not None:
        state, label = "agent", "Agent driving"
    else:
        state, label = "nobody", "Nobody is driving"
    return {
        "state": state,
        "label": label,
        "user": name if lease.holder == Holder.PERSON else None,
        "run": {"id": run.pk, "status": run_status} if run is not None else None,
        "since": lease.changed_at.isoformat(),
    }


def state_json(lease: ControlLease, user: Any) -> dict[str, Any]:
    """The banner for one user, with the buttons they may press."""
    state = summary(lease)
    mine = lease.holder == Holder.PERSON and lease.user_id == user.pk
    if mine and lease.granted:
        state["label"] = "You are driving"
        state["state"] = "you"
    usable = can_use(user, lease.sandbox)
    person = lease.holder == Holder.PERSON
    run = state["run"]
    state["version"] = lease.version
    state["may"] = {
        "take_over": usable and not person and lease.sandbox.phase == Phase.READY,
        "hand_back": person and (mine or is_admin(user)),
        "resume": usable and not person and run is not None and run["status"] == RunStatus.PAUSED,
    }
    if person and lease.span_id:
        state["span"] = lease.span_id
    return state


# --- changing ----------------------------------------------------------------------------


def _changed(lease: ControlLease) -> None:
    lease.version += 1
    lease.changed_at = timezone.now()
    lease.save()


def _publish(lease: ControlLease) -> None:
    """Tell every web process (connections) and the dashboards, after the commit."""
    message = {"type": "control.changed", "lease": wire(lease)}
    layer = get_channel_layer()
    if layer is not None:
        try:
            async_to_sync(layer.group_send)(group_name(lease.sandbox_id), message)
        except Exception:  # connections re-read the lease when they open; the log has it
            log.exception("publishing the lease of sandbox %s failed", lease.sandbox_id)
    announce(lease.sandbox_id)


def announce(sandbox_id: int) -> None:
    """Send the sandbox, with who drives it, to the dashboards (its agent paused...)."""
    from sandboxes import services  # services imports runs, which imports this module

    sandbox = Sandbox.objects.select_related("owner", "lease__user", "lease__run").filter(pk=sandbox_id).first()
    if sandbox is not None:
        services.broadcast(sandbox)


def _event(
    sandbox: Sandbox, kind: str, text: str, user: Any, data: dict[str, Any], *, screenshot: bytes | None = None
) -> None:
    actor = user.get_username() if user is not None else ""
    source = "person" if user is not None else "system"
    events.append(sandbox, events.NewEvent(kind, text, data, source=source, actor=actor, screenshot=screenshot))


@dataclass
class Request:
    """A granted request, still to settle: the agent to wait for, if any."""

    span_id: int
    run_id: int | None
    already: bool = False


def request(sandbox_id: int, user: Any) -> Request:
    """Give the lease to ``user`` (not yet interactive) or raise ControlError. Both the
    request and a refusal are logged."""
    refusal: ControlError | None = None
    with transaction.atomic():
        sandbox, lease = _locked(sandbox_id)
        name = user.get_username()
        if lease.holder == Holder.PERSON and lease.user_id == user.pk:
            return Request(lease.span_id or 0, lease.run_id, already=True)
        _event(sandbox, "control.requested", f"{name} asked to take over", user, {})
        if not can_use(user, sandbox):
            refusal = ControlError(f"{name} may not take over this sandbox (viewers only watch)", 403)
        elif sandbox.phase != Phase.READY:
            refusal = ControlError(f"the sandbox is {sandbox.phase}, not ready")
        elif lease.holder == Holder.PERSON:
            holder = lease.user.get_username() if lease.user else "someone"
            refusal = ControlError(f"{holder} is {'driving' if lease.granted else 'taking over'}")
        if refusal is not None:
            why = str(refusal)
            _event(sandbox, "control.refused", f"{name} was refused: {why}", user, {"reason": why})
        else:
            run = lease.run if lease.run_id and lease.run and lease.run.is_active else None
            span = ControlSpan.objects.create(sandbox=sandbox, user=user, username=name, run=run)
            lease.holder, lease.user, lease.span, lease.granted = Holder.PERSON, user, span, False
            lease.seen_at = timezone.now()
            _changed(lease)
            transaction.on_commit(lambda: _publish(lease))
    if refusal is not None:
        raise refusal
    return Request(span.pk, run.pk if run else None)


def grant(span_id: int, confirmed: bool | None, waited: float, screenshot: bytes | None) -> bool:
    """Make the span's holder interactive (the agent paused, or did not say in time)."""
    with transaction.atomic():
        span = ControlSpan.objects.select_related("user").filter(pk=span_id).first()
        if span is None:
            return False
        sandbox, lease = _locked(span.sandbox_id)
        if lease.span_id != span_id or lease.granted:
            return False  # released meanwhile, or the sandbox went
        now = timezone.now()
        span.granted_at, span.agent_confirmed = now, confirmed
        span.save(update_fields=["granted_at", "agent_confirmed"])
        lease.granted, lease.seen_at = True, now
        _changed(lease)
        waited = round(waited, 2)
        if confirmed is None:
            text, agent = f"{span.username} took over", "none"
        elif confirmed:
            text, agent = f"{span.username} took over; the agent paused in {waited} s", "paused"
        else:
            text = f"{span.username} took over; the agent did not confirm its pause within {waited} s"
            agent = "unconfirmed"
        data = {"span": span.pk, "run": span.run_id, "agent": agent, "waited": waited}
        _event(sandbox, "control.granted", text, span.user, data, screenshot=screenshot)
        transaction.on_commit(lambda: _publish(lease))
    return True


def release(
    sandbox_id: int,
    by: Any,
    note: str = "",
    *,
    how: str = ControlSpan.Ended.HANDED_BACK,
    expected_span: int | None = None,
    screenshot: bytes | None = None,
) -> ControlSpan:
    """End the current person's control: ``how`` is handed_back (by the holder), released
    (by an admin, or the sandbox going: ``by`` None) or lapsed. The lease goes to the
    active agent run, which is resumed with the note (not after a lapse), or to nobody."""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ControlError(f"note: a string of at most {MAX_NOTE} characters", 400)
    with transaction.atomic():
        sandbox, lease = _locked(sandbox_id)
        span = ControlSpan.objects.filter(pk=lease.span_id).first() if lease.holder == Holder.PERSON else None
        if span is None or (expected_span is not None and span.pk != expected_span):
            raise ControlError("nobody holds control")
        if how == ControlSpan.Ended.HANDED_BACK and by is not None and lease.user_id != by.pk:
            if not is_admin(by):
                raise ControlError(f"{span.username} is driving: only they or an admin can hand back", 403)
            how = ControlSpan.Ended.RELEASED
        now = timezone.now()
        span.refresh_from_db()  # the input counts connections added
        span.ended_at, span.ended, span.note = now, how, note.strip()
        span.ended_by = by.get_username() if by is not None else ""
        span.save()
        run = lease.run if lease.run_id and lease.run and lease.run.is_active else None
        resume = run is not None and how != ControlSpan.Ended.LAPSED
        lease.holder = Holder.AGENT if resume else Holder.NOBODY
        lease.user, lease.span, lease.granted, lease.seen_at = None, None, False, None
        _changed(lease)
        seconds = round((now - (span.granted_at or span.requested_at)).total_seconds(), 1)
        inputs = span.inputs
        total = sum(inputs.values())
        data = {"span": span.pk, "run": run.pk if run else None, "seconds": seconds, "inputs": inputs}
        if how == ControlSpan.Ended.LAPSED:
            lapse = settings.NAMEK_CONTROL_LAPSE
            text = f"{span.username}'s control lapsed after {seconds} s: no connection for {lapse:g} s" + (
                "; the agent stays paused" if run else ""
            )
            _event(sandbox, "control.lapsed", text, None, {**data, "user": span.username, "lapse": lapse})
        else:
            who = (
                f"{span.username} handed back"
                if how == ControlSpan.Ended.HANDED_BACK
                else (
                    f"{span.ended_by} released {span.username}'s control"
                    if by is not None
                    else f"{span.username}'s control ended"
                )
            )
            text = f"{who} after {seconds} s ({total} input events)" + (
                f" with the note: {span.note}" if span.note else ""
            )
            data.update(user=span.username, note=span.note, by=span.ended_by, how=how)
            _event(sandbox, "control.handed_back", text, by, data, screenshot=screenshot)
        transaction.on_commit(lambda: _publish(lease))
    if resume and run is not None:
        from sandboxes import runs

        runs.send_command(run.pk, "resume", span.note)
    return span


def resume_agent(sandbox_id: int, user: Any, run_id: int, note: str = "") -> None:
    """ "Resume agent" when nobody drives (after a lapse, or a pause): the run drives again."""
    with transaction.atomic():
        _sandbox, lease = _locked(sandbox_id)
        if lease.holder == Holder.PERSON:
            holder = lease.user.get_username() if lease.user else "someone"
            raise ControlError(f"{holder} is driving: they hand back to resume the agent")
        if lease.run_id == run_id and lease.holder != Holder.AGENT:
            lease.holder = Holder.AGENT
            _changed(lease)
            transaction.on_commit(lambda: _publish(lease))


# --- the agent run's side ------------------------------------------------------------------


def run_starting(sandbox_id: int, run: Any) -> None:
    """In the run's creating transaction: it drives, unless a person does (ControlError)."""
    _sandbox, lease = _locked(sandbox_id)
    if lease.holder == Holder.PERSON:
        holder = lease.user.get_username() if lease.user else "someone"
        raise ControlError(f"{holder} is driving: hand back before starting an agent")
    lease.run, lease.holder = run, Holder.AGENT
    _changed(lease)
    transaction.on_commit(lambda: _publish(lease))


def run_ended(sandbox_id: int, run_id: int) -> None:
    """In the run's ending transaction: if it drove, nobody does now."""
    lease = ControlLease.objects.select_for_update().filter(sandbox_id=sandbox_id, run_id=run_id).first()
    if lease is None:
        return
    lease.run = None
    if lease.holder == Holder.AGENT:
        lease.holder = Holder.NOBODY
    _changed(lease)
    transaction.on_commit(lambda: _publish(lease))


def sandbox_ending(sandbox_id: int) -> None:
    """The sandbox is stopping: a person's control ends with it."""
    with contextlib.suppress(ControlError):
        release(sandbox_id, None, how=ControlSpan.Ended.RELEASED)


# --- the connections' side -----------------------------------------------------------------


def touch(sandbox_id: int, span_id: int) -> None:
    """One of the holder's connections is alive (or just closed)."""
    ControlLease.objects.filter(sandbox_id=sandbox_id, span_id=span_id).update(seen_at=timezone.now())


def count_inputs(span_id: int, counts: dict[str, int]) -> None:
    """Add what one of the holder's connections forwarded."""
    updates = {kind: F(kind) + n for kind, n in counts.items() if kind in INPUT_KINDS and n > 0}
    if updates:
        ControlSpan.objects.filter(pk=span_id).update(**updates)


def expire_lapsed() -> int:
    """Lapse every person's control whose connections have all been gone too long."""
    cutoff = timezone.now() - timedelta(seconds=settings.NAMEK_CONTROL_LAPSE)
    lapsed = 0
    for sandbox_id, span_id in ControlLease.objects.filter(holder=Holder.PERSON, seen_at__lt=cutoff).values_list(
        "sandbox_id", "span_id"
    ):
        with contextlib.suppress(ControlError):
            release(sandbox_id, None, how=ControlSpan.Ended.LAPSED, expected_span=span_id)
            lapsed += 1
    return lapsed


# --- the whole take-over, and the screenshots ---------------------------------------------------


async def take_over(sandbox_id: int, user: Any) -> dict[str, Any]:
    """Request, pause the agent and wait for it, grant. Raises ControlError.

    Runs to the end even if the caller goes away (the HTTP request is cancelled): the
    lease must not stay half-granted."""
    granted = await sync_to_async(request)(sandbox_id, user)
    if not granted.already:
        await asyncio.shield(asyncio.ensure_future(_settle(sandbox_id, granted)))
    lease = await sync_to_async(lease_of)(sandbox_id)
    return await sync_to_async(state_json)(lease, user)


async def _settle(sandbox_id: int, granted: Request) -> None:
    from sandboxes import runs

    started = asyncio.get_running_loop().time()
    confirmed: bool | None = None
    if granted.run_id is not None:
        status = await sync_to_async(runs.status_of)(granted.run_id)
        if status in (RunStatus.PENDING, RunStatus.RUNNING):
            await sync_to_async(runs.send_command)(granted.run_id, "pause")
        deadline = started + settings.NAMEK_TAKEOVER_PAUSE_TIMEOUT
        while status in (RunStatus.PENDING, RunStatus.RUNNING) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(PAUSE_POLL)
            status = await sync_to_async(runs.status_of)(granted.run_id)
        confirmed = (
            status == RunStatus.PAUSED if status in (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.PAUSED) else None
        )
    waited = asyncio.get_running_loop().time() - started
    image = await screenshot(sandbox_id)
    await sync_to_async(grant)(granted.span_id, confirmed, waited, image)


def _screen_target(sandbox_id: int) -> Any:
    sandbox = Sandbox.objects.filter(pk=sandbox_id).first()
    if sandbox is None or sandbox.phase != Phase.READY:
        return None
    return get_backend(sandbox.backend).screen_target(sandbox_id)


async def grab(target: Any) -> bytes:
    """One frame of ``target`` (a ScreenTarget) as PNG (JPEG if too big for an event)."""
    endpoint = target.endpoint

    async def read() -> tuple[int, int, bytes]:
        if endpoint.unix_path:
            reader, writer = await asyncio.open_unix_connection(endpoint.unix_path, limit=1 << 20)
        else:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=1 << 20)
        try:
            return await rfb.capture(reader, writer, target.password)
        finally:
            writer.close()

    width, height, pixels = await asyncio.wait_for(read(), SCREENSHOT_TIMEOUT)
    return await asyncio.get_running_loop().run_in_executor(None, _encode, width, height, pixels)


async def screenshot(sandbox_id: int) -> bytes | None:
    """The sandbox's screen as a PNG (JPEG if the PNG is too big for an event), or None."""
    try:
        target = await sync_to_async(_screen_target, thread_sensitive=False)(sandbox_id)
        return None if target is None else await grab(target)
    except Exception as exc:  # a missing screenshot must not stop a take-over or hand-back
        log.warning("sandbox %s: no screenshot: %r", sandbox_id, exc)
        return None


def screenshot_now(sandbox_id: int) -> bytes | None:
    """``screenshot`` from synchronous code (a thread without a running event loop).

    Only plain threads below: this may run in asgiref's one thread for sync code, which
    a nested thread-sensitive call would wait for forever."""
    try:
        target = _screen_target(sandbox_id)
        return None if target is None else asyncio.run(grab(target))
    except Exception as exc:
        log.warning("sandbox %s: no screenshot: %r", sandbox_id, exc)
        return None


def _encode(width: int, height: int, pixels: bytes) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (width, height), pixels, "raw", "BGRX")
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=3)
    if out.tell() <= events.MAX_SCREENSHOT_BYTES:
        return out.getvalue()
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()

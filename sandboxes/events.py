"""A sandbox's event log: what happened in it, in order, for people to read and replay.

Every event is stored first, then published to the channel-layer group ``events-<id>``
once its transaction commits; ``viewer.consumers.events`` turns the store and the group
into a gapless stream. Each sandbox numbers its events 1, 2, 3, ... (``seq``) under a
lock on its row, so numbers are never skipped nor reused, whichever process writes.

An event as the API and the websocket send it::

    {"sandbox": 7, "seq": 12, "at": "2026-11-27T05:31:02.114+00:00",
     "kind": "sandbox.ready", "source": "system", "actor": "namek",
     "text": "Ready after 1.9 s", "data": {"seconds": 1.9},
     "screenshot_url": null, "thumbnail_url": null}

``source`` is ``system`` (Namek itself; actor ``namek``), ``agent`` (an agent run; actor
its name) or ``person`` (actor the username). ``text`` is plain text of at most
``MAX_TEXT`` characters (longer is cut, ending in "…"); pages show it literally. A
screenshot is a PNG or JPEG of at most ``MAX_SCREENSHOT_BYTES``; Namek keeps it and a JPEG
thumbnail at most ``THUMBNAIL_SIZE``, served only to those who may see the sandbox.

The kinds (``KINDS`` below is this table, and the only list of them):

=========================== ======== ==========================================================
kind                        source   data
=========================== ======== ==========================================================
sandbox.created             person   ``name``, ``screen`` (WIDTHxHEIGHT), ``backend``
sandbox.ready               system   ``seconds``: from created to ready
sandbox.browser_restarted   system   ``reason`` (a crash, or "restarted by <user>"),
                                     ``restarts``: how many so far
sandbox.stopping            either   ``reason``: empty when a person asked
sandbox.stopped             system   ``reason``: empty when a person asked
sandbox.failed              system   ``reason``
terminal.opened             person   ``readonly``: whether this viewer may type
terminal.closed             person   ``readonly``, ``seconds`` attached, ``code``: the close code
person.note                 person   whatever JSON object the person attached (may be empty)
agent.started               agent    ``run``, ``task``, ``model`` ("scripted" or the LLM's name)
agent.step                  agent    ``run``, ``step`` (1, 2, ...), ``goal``, ``thinking``,
                                     ``evaluation``, ``actions`` ([{"name", "params"}]),
                                     ``url``, ``title``; with a screenshot
agent.log                   agent    ``run``, anything else the agent adds
agent.paused                agent    ``run``
agent.resumed               agent    ``run``, ``note`` (given with the resume, or empty)
agent.done                  agent    ``run``, ``result``, ``steps``, ``seconds``
agent.failed                agent    ``run``, ``error``, ``steps``, ``seconds``
control.requested           person   (none): someone asked to take over
control.refused             person   ``reason``: why not (someone else drives, not allowed...)
control.granted             person   ``span``, ``run``, ``agent`` ("paused", "unconfirmed": no
                                     pause ack within the timeout, "none": no agent),
                                     ``waited`` seconds; with a screenshot
control.handed_back         either   ``span``, ``run``, ``user``, ``seconds`` in control,
                                     ``inputs`` ({keys, pointer, clipboard, terminal}),
                                     ``note``, ``by``, ``how`` ("handed_back", or "released"
                                     by an admin or the sandbox stopping); with a screenshot
control.lapsed              system   ``span``, ``run``, ``user``, ``seconds``, ``inputs``,
                                     ``lapse``: the holder's connections were all gone that long
share.opened                system   ``link`` (its id), ``where`` (``page``), ``wall`` (false): someone
                                     opened the sandbox through a read-only share link (actor
                                     "share link #N"); a wall link's uses are only counted on the link
=========================== ======== ==========================================================

A kind not in the table is refused (``EventError``): a later issue adds its kinds here.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from PIL import Image, UnidentifiedImageError

from sandboxes.models import Event, Sandbox, Source

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "namek"
MAX_TEXT = 1000
MAX_DATA_BYTES = 16 * 1024
MAX_SCREENSHOT_BYTES = 4 * 1024 * 1024
MAX_SCREENSHOT_PIXELS = 3840 * 2160 * 2
THUMBNAIL_SIZE = (320, 200)
#: the largest sequence number (a PositiveBigIntegerField holds up to 2**63 - 1)
MAX_SEQ = 2**63 - 1
#: events per group message when many are written at once
PUBLISH_BATCH = 200


@dataclass(frozen=True)
class Kind:
    source: str  # the source an event of this kind has unless the writer says otherwise
    data: str  # its data fields, in words (the table above)


KINDS: dict[str, Kind] = {
    "sandbox.created": Kind(Source.PERSON, "name, screen, backend"),
    "sandbox.ready": Kind(Source.SYSTEM, "seconds"),
    "sandbox.browser_restarted": Kind(Source.SYSTEM, "reason, restarts"),
    "sandbox.stopping": Kind(Source.PERSON, "reason"),
    "sandbox.stopped": Kind(Source.SYSTEM, "reason"),
    "sandbox.failed": Kind(Source.SYSTEM, "reason"),
    "terminal.opened": Kind(Source.PERSON, "readonly"),
    "terminal.closed": Kind(Source.PERSON, "readonly, seconds, code"),
    "person.note": Kind(Source.PERSON, "any JSON object"),
    "agent.started": Kind(Source.AGENT, "run, task, model"),
    "agent.step": Kind(Source.AGENT, "run, step, goal, thinking, evaluation, actions, url, title"),
    "agent.log": Kind(Source.AGENT, "run, ..."),
    "agent.paused": Kind(Source.AGENT, "run"),
    "agent.resumed": Kind(Source.AGENT, "run, note"),
    "agent.done": Kind(Source.AGENT, "run, result, steps, seconds"),
    "agent.failed": Kind(Source.AGENT, "run, error, steps, seconds"),
    "control.requested": Kind(Source.PERSON, "(none)"),
    "control.refused": Kind(Source.PERSON, "reason"),
    "control.granted": Kind(Source.PERSON, "span, run, agent, waited"),
    "control.handed_back": Kind(Source.PERSON, "span, run, user, seconds, inputs, note, by, how"),
    "control.lapsed": Kind(Source.SYSTEM, "span, run, user, seconds, inputs, lapse"),
    "share.opened": Kind(Source.SYSTEM, "link, where, wall"),
}
#: families of kinds that later issues define; nothing may write them before then
RESERVED_PREFIXES: tuple[str, ...] = ()


class EventError(ValueError):
    """An event that cannot be stored as given (unknown kind, data too big, bad image)."""


@dataclass
class NewEvent:
    kind: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    actor: str = ""
    screenshot: bytes | None = None


def group_name(sandbox_id: int) -> str:
    return f"events-{sandbox_id}"


def event_json(event: Event) -> dict[str, Any]:
    base = f"/api/sandboxes/{event.sandbox_id}/events/{event.seq}"
    return {
        "sandbox": event.sandbox_id,
        "seq": event.seq,
        "at": event.at.isoformat(),
        "kind": event.kind,
        "source": event.source,
        "actor": event.actor,
        "text": event.text,
        "data": event.data,
        "screenshot_url": f"{base}/screenshot" if event.screenshot else None,
        "thumbnail_url": f"{base}/thumbnail" if event.thumbnail else None,
    }


def parse_seq(value: str | None, name: str, default: int) -> int:
    """A non-negative whole number from a query parameter (ASCII digits only); ValueError."""
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_SEQ:
        raise ValueError(f"{name}: must be a whole number from 0 to {MAX_SEQ}, not {value[:40]!r}")
    return int(value)


def events_after(sandbox_id: int, after: int, limit: int) -> list[dict[str, Any]]:
    events = Event.objects.filter(sandbox_id=sandbox_id, seq__gt=after).order_by("seq")[:limit]
    return [event_json(e) for e in events]


def newest_seq(sandbox_id: int) -> int:
    return int(Sandbox.objects.filter(pk=sandbox_id).values_list("event_seq", flat=True).first() or 0)


# --- writing ------------------------------------------------------------------------------


def record(sandbox_id: int, kind: str, text: str = "", **fields: Any) -> dict[str, Any] | None:
    """Store one event, then publish it. Returns it as JSON, or None if the sandbox is gone."""
    stored = record_many(sandbox_id, [NewEvent(kind, text, **fields)])
    return stored[0] if stored else None


def record_many(sandbox_id: int, new_events: list[NewEvent]) -> list[dict[str, Any]]:
    """Store events with consecutive numbers in one transaction, then publish them."""
    for new in new_events:
        _check(new)
    files = [_store_screenshot(sandbox_id, new.screenshot) for new in new_events]
    stored: list[Event] = []
    try:
        with transaction.atomic():
            sandbox = Sandbox.objects.select_for_update().filter(pk=sandbox_id).first()
            if sandbox is not None:
                stored = [_insert(sandbox, new, shot) for new, shot in zip(new_events, files, strict=True)]
                payloads = [event_json(e) for e in stored]
                transaction.on_commit(lambda: publish(sandbox_id, payloads))
    finally:
        if not stored:
            for names in files:
                _delete_files(names)
    return [event_json(e) for e in stored]


def append(sandbox: Sandbox, new: NewEvent) -> Event:
    """Add an event to a sandbox whose row the caller holds locked in a transaction
    (``select_for_update``); it is published when that transaction commits."""
    _check(new)
    # A file left behind by a rolled-back transaction is removed with the sandbox's files.
    event = _insert(sandbox, new, _store_screenshot(sandbox.pk, new.screenshot))
    payload = event_json(event)
    transaction.on_commit(lambda: publish(sandbox.pk, [payload]))
    return event


def _insert(sandbox: Sandbox, new: NewEvent, files: tuple[str, str]) -> Event:
    sandbox.event_seq += 1
    Sandbox.objects.filter(pk=sandbox.pk).update(event_seq=sandbox.event_seq)
    source = new.source or KINDS[new.kind].source
    actor = new.actor or (SYSTEM_ACTOR if source == Source.SYSTEM else "")
    return Event.objects.create(
        sandbox=sandbox,
        seq=sandbox.event_seq,
        at=timezone.now(),
        kind=new.kind,
        source=source,
        actor=actor[:150],
        text=_short(new.text),
        data=new.data,
        screenshot=files[0],
        thumbnail=files[1],
    )


def publish(sandbox_id: int, payloads: list[dict[str, Any]]) -> None:
    """Send stored events to the sandbox's group. A lost message only delays them: the
    events socket finds gaps by number and reads them from the database."""
    layer = get_channel_layer()
    if layer is None or not payloads:
        return
    try:
        for start in range(0, len(payloads), PUBLISH_BATCH):
            message = {"type": "events.new", "events": payloads[start : start + PUBLISH_BATCH]}
            async_to_sync(layer.group_send)(group_name(sandbox_id), message)
    except Exception:  # the event is stored; subscribers catch up from the database
        log.exception("publishing events of sandbox %s failed", sandbox_id)


def poke(sandbox_id: int) -> None:
    """Tell this process's subscribers that events may have been stored elsewhere."""
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(group_name(sandbox_id), {"type": "events.poke", "sandbox": sandbox_id})


# --- checks and files ----------------------------------------------------------------------


def _check(new: NewEvent) -> None:
    if new.kind not in KINDS:
        reserved = any(new.kind.startswith(p) for p in RESERVED_PREFIXES)
        raise EventError(f"kind {new.kind[:64]!r} is {'reserved, not defined yet' if reserved else 'unknown'}")
    if new.source is not None and new.source not in Source.values:
        raise EventError(f"source must be one of {', '.join(Source.values)}")
    if not isinstance(new.text, str):
        raise EventError("text: must be a string")
    if not isinstance(new.data, dict):
        raise EventError("data: must be a JSON object")
    try:
        size = len(json.dumps(new.data, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise EventError(f"data: not JSON ({exc})") from None
    if size > MAX_DATA_BYTES:
        raise EventError(f"data: {size} bytes as JSON, more than {MAX_DATA_BYTES}")
    if new.screenshot is not None and len(new.screenshot) > MAX_SCREENSHOT_BYTES:
        raise EventError(f"screenshot: {len(new.screenshot)} bytes, more than {MAX_SCREENSHOT_BYTES}")


def _short(text: str) -> str:
    text = text.replace("\x00", "")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _store_screenshot(sandbox_id: int, image: bytes | None) -> tuple[str, str]:
    """Check the image and save it with its thumbnail: their storage names, or ("", "")."""
    if image is None:
        return "", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(image))
        with picture:
            if picture.format not in ("PNG", "JPEG"):
                raise EventError(f"screenshot: {picture.format} is not PNG or JPEG")
            if picture.width * picture.height > MAX_SCREENSHOT_PIXELS:
                raise EventError(f"screenshot: {picture.width}x{picture.height} pixels is too large")
            extension = "png" if picture.format == "PNG" else "jpg"
            picture.thumbnail(THUMBNAIL_SIZE)
            thumb = io.BytesIO()
            picture.convert("RGB").save(thumb, "JPEG", quality=80)
    except EventError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise EventError(f"screenshot: not a readable PNG or JPEG ({exc})") from None
    stem = f"screenshots/{sandbox_id}/{secrets.token_hex(8)}"
    full = default_storage.save(f"{stem}.{extension}", ContentFile(image))
    small = default_storage.save(f"{stem}-thumb.jpg", ContentFile(thumb.getvalue()))
    return full, small


def _delete_files(names: tuple[str, str]) -> None:
    for name in names:
        if name:
            try:
                default_storage.delete(name)
            except OSError:
                log.warning("could not delete %s", name)


def delete_screenshots(sandbox_id: int) -> None:
    """Remove a sandbox's screenshots (with its rows), whichever storage keeps them."""
    default_storage.delete_tree(f"screenshots/{sandbox_id}")  # type: ignore[attr-defined]

"""The replay of an agent run: its timeline, the page that scrubs and plays it, the same
replay exported as one self-contained HTML file, and the run's screen recording.

The timeline of a run is built from what is stored, nothing else: the events of its
sandbox from the run's creation to its end (or now) that belong to it (``agent.*`` with
``data.run`` = the run) or happened meanwhile (``control.*``, ``terminal.*``,
``sandbox.*``, ``person.note``); the people's spans of control (``ControlSpan`` rows of the
run, or overlapping it in time) with who and the note; terminal sessions (a
``terminal.closed`` says how long it was attached; an ``opened`` with no ``closed`` is
still open); and failures (``agent.failed``, ``control.refused``, ``sandbox.failed``, a
browser crash, a step or log line that carries an error). Every time is an offset in
seconds from the run's creation, which is also where its screen recording starts (within
a second: the recorder's ``screen.json`` says exactly when).

The export inlines the CSS, the JS, the thumbnails, the full screenshots of steps and
take-overs (re-encoded as JPEG, at most ``EXPORT_SHOT_WIDTH`` wide, until
``EXPORT_MAX_IMAGE_BYTES``) and the recording (only under ``EXPORT_MAX_VIDEO_BYTES``): it
opens from disk, with no server and no request anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.files.storage import default_storage
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET
from PIL import Image

from sandboxes.access import can_view
from sandboxes.models import AgentRun, ControlSpan, Event

log = logging.getLogger(__name__)

#: events of one run's timeline at most (the oldest are kept)
MAX_ITEMS = 5000
#: how far before the run a terminal session or take-over may have begun and still count
LOOKBACK = timedelta(hours=12)
#: the export: full screenshots (as JPEG, at most this wide) until this many bytes in all;
#: thumbnails until their own cap; the recording only if it is at most this big
EXPORT_MAX_IMAGE_BYTES = 30 * 1024 * 1024
EXPORT_MAX_THUMBNAIL_BYTES = 8 * 1024 * 1024
EXPORT_MAX_VIDEO_BYTES = 25 * 1024 * 1024
EXPORT_SHOT_WIDTH = 1600
EXPORT_JPEG_QUALITY = 80
#: kinds whose full screenshot the export keeps
EXPORT_SHOT_KINDS = ("agent.step", "control.granted", "control.handed_back")
#: the run's recording and what the recorder says of it, in ``<data dir>/runs/<id>/``
RECORDING_NAME = "screen.webm"
RECORDING_INFO = "screen.json"
STATIC_DIR = Path(settings.BASE_DIR) / "static" / "namek"
ERROR_WORDS = re.compile(r"\b(error|exception|traceback|failed|failure)\b", re.IGNORECASE)


# --- the timeline ------------------------------------------------------------------------


@dataclass
class Timeline:
    run: AgentRun
    start: datetime
    end: datetime
    items: list[dict[str, Any]]
    takeovers: list[dict[str, Any]]
    terminals: list[dict[str, Any]]
    truncated: bool = False

    @property
    def duration(self) -> float:
        return round(max(0.0, (self.end - self.start).total_seconds()), 3)

    def offset(self, at: datetime) -> float:
        return round((at - self.start).total_seconds(), 3)


def category(kind: str) -> str:
    if kind == "agent.step":
        return "step"
    return {"agent": "agent", "control": "control", "terminal": "terminal", "sandbox": "sandbox"}.get(
        kind.split(".", 1)[0], "note"
    )


def is_failure(event: Event) -> bool:
    data = event.data if isinstance(event.data, dict) else {}
    if event.kind in ("agent.failed", "control.refused", "sandbox.failed"):
        return True
    if event.kind == "sandbox.browser_restarted":
        return not str(data.get("reason", "")).startswith("restarted by")
    if event.kind == "agent.step":
        return bool(data.get("error"))
    if event.kind == "agent.log":
        level = str(data.get("level", "")).lower()
        return (
            bool(data.get("error")) or level in ("error", "critical", "warning") or bool(ERROR_WORDS.search(event.text))
        )
    return False


def _text(value: Any, limit: int = 2000) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _actions(data: dict[str, Any]) -> list[str]:
    """A step's actions as short lines: ``click {"index": 4}``."""
    found = data.get("actions")
    lines = []
    for action in found if isinstance(found, list) else []:
        if isinstance(action, dict):
            params = action.get("params")
            lines.append(f"{_text(action.get('name'), 80)} {_text(params, 300) if params else ''}".strip())
    return lines[:20]


def item_json(event: Event, timeline: Timeline) -> dict[str, Any]:
    data = event.data if isinstance(event.data, dict) else {}
    base = f"/api/sandboxes/{event.sandbox_id}/events/{event.seq}"
    item: dict[str, Any] = {
        "seq": event.seq,
        "kind": event.kind,
        "category": category(event.kind),
        "at": event.at.isoformat(),
        "offset": timeline.offset(event.at),
        "source": event.source,
        "actor": event.actor,
        "text": event.text,
        "failure": is_failure(event),
        "screenshot": f"{base}/screenshot" if event.screenshot else None,
        "thumbnail": f"{base}/thumbnail" if event.thumbnail else None,
    }
    if event.kind == "agent.step":
        item["step"] = data.get("step")
        item["detail"] = {
            "goal": _text(data.get("goal")),
            "evaluation": _text(data.get("evaluation")),
            "thinking": _text(data.get("thinking")),
            "actions": _actions(data),
            "url": _text(data.get("url"), 500),
            "title": _text(data.get("title"), 300),
            "error": _text(data.get("error")),
        }
    elif event.kind in ("agent.failed", "agent.done"):
        item["detail"] = {"result": _text(data.get("result")), "error": _text(data.get("error"))}
    elif event.kind.startswith("control.") and data.get("note"):
        item["detail"] = {"note": _text(data.get("note"))}
    return item


def build_timeline(run: AgentRun, now: datetime | None = None) -> Timeline:
    """The run's timeline from the rows (see the module's docstring)."""
    now = now or timezone.now()
    start = run.created_at
    end = run.ended_at or now
    mine = Q(kind__startswith="agent.", data__run=run.pk)
    meanwhile = (
        Q(at__gte=start, at__lte=end)
        & ~Q(kind__startswith="agent.")
        & ~Q(kind__startswith="share.")
        & ~Q(kind__startswith="terminal.")
    )
    events = list(
        Event.objects.filter(sandbox_id=run.sandbox_id).filter(mine | meanwhile).order_by("seq")[: MAX_ITEMS + 1]
    )
    truncated = len(events) > MAX_ITEMS
    events = events[:MAX_ITEMS]
    # The run's own last event (agent.done) comes a moment after its ended_at.
    end = max([end, *(e.at for e in events if e.kind.startswith("agent."))])
    timeline = Timeline(run, start, end, [], [], [])
    terminal_events, terminals = _terminal_sessions(run, timeline)
    timeline.terminals = terminals
    events = sorted([*events, *terminal_events], key=lambda e: (e.at, e.seq))
    timeline.items = [item_json(e, timeline) for e in events]
    timeline.takeovers = _takeovers(run, timeline)
    timeline.truncated = truncated
    return timeline


def _takeovers(run: AgentRun, timeline: Timeline) -> list[dict[str, Any]]:
    overlapping = Q(requested_at__lte=timeline.end) & (Q(ended_at__isnull=True) | Q(ended_at__gte=timeline.start))
    spans = ControlSpan.objects.filter(sandbox_id=run.sandbox_id).filter(Q(run=run) | overlapping)
    found = []
    for span in spans.order_by("requested_at", "pk")[:500]:
        ended = span.ended_at
        found.append(
            {
                "id": span.pk,
                "user": span.username,
                "start": timeline.offset(span.requested_at),
                "granted": timeline.offset(span.granted_at) if span.granted_at else None,
                "end": timeline.offset(ended or timeline.end),
                "open": ended is None,
                "ended": span.ended,
                "ended_by": span.ended_by,
                "note": span.note,
                "agent_confirmed": span.agent_confirmed,
                "inputs": span.inputs,
                "seconds": round(((ended or timeline.end) - (span.granted_at or span.requested_at)).total_seconds(), 1),
            }
        )
    return found


def _terminal_sessions(run: AgentRun, timeline: Timeline) -> tuple[list[Event], list[dict[str, Any]]]:
    """The terminal events in the run's window, and the sessions overlapping it.

    A ``terminal.closed`` says how long it was attached (``seconds``); it is matched to
    the ``terminal.opened`` of the same person and mode that long before, and an opened
    session with no close is open until the window's end.
    """
    rows = list(
        Event.objects.filter(sandbox_id=run.sandbox_id, kind__in=("terminal.opened", "terminal.closed"))
        .filter(at__gte=timeline.start - LOOKBACK)
        .filter(Q(kind="terminal.closed") | Q(at__lte=timeline.end))
        .order_by("at", "seq")[:4000]
    )
    opened = [e for e in rows if e.kind == "terminal.opened"]
    used: set[int] = set()
    sessions: list[dict[str, Any]] = []

    def readonly(event: Event) -> bool:
        return bool(event.data.get("readonly")) if isinstance(event.data, dict) else False

    for closed in (e for e in rows if e.kind == "terminal.closed"):
        data = closed.data if isinstance(closed.data, dict) else {}
        try:
            seconds = max(0.0, float(data.get("seconds", 0)))
        except (TypeError, ValueError):
            seconds = 0.0
        began = closed.at - timedelta(seconds=seconds)
        match = next(
            (
                o
                for o in opened
                if o.pk not in used
                and o.actor == closed.actor
                and readonly(o) == readonly(closed)
                and abs((o.at - began).total_seconds()) <= 3
            ),
            None,
        )
        if match is not None:
            used.add(match.pk)
            began = match.at
        if closed.at >= timeline.start and began <= timeline.end:
            sessions.append(_session(timeline, closed.actor, readonly(closed), began, closed.at, open_=False))
    for event in opened:
        if event.pk not in used and event.at <= timeline.end:
            sessions.append(_session(timeline, event.actor, readonly(event), event.at, timeline.end, open_=True))
    sessions.sort(key=lambda s: (s["start"], s["end"]))
    in_window = [e for e in rows if timeline.start <= e.at <= timeline.end]
    return in_window, sessions


def _session(timeline: Timeline, user: str, readonly: bool, began: datetime, ended: datetime, *, open_: bool) -> dict:
    return {
        "user": user,
        "readonly": readonly,
        "start": timeline.offset(began),
        "end": timeline.offset(ended),
        "open": open_,
        "seconds": round((ended - began).total_seconds(), 1),
    }


# --- the recording -----------------------------------------------------------------------


def recording_path(run_id: int) -> Path:
    return Path(settings.DATA_DIR) / "runs" / str(run_id) / RECORDING_NAME


def recording_info(run: AgentRun, timeline: Timeline, backend: str) -> dict[str, Any]:
    """Whether the run has a recording, where it starts on the timeline, and why not."""
    path = recording_path(run.pk)
    if backend != "local":
        return {"available": False, "note": "No recording: sandboxes on this backend are not recorded."}
    try:
        size = path.stat().st_size
    except OSError:
        return {"available": False, "note": "No recording of this run."}
    if not size:
        return {"available": False, "note": "No recording of this run (its file is empty)."}
    meta: Any = {}
    try:
        meta = json.loads(path.with_name(RECORDING_INFO).read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(meta, dict):
        meta = {}
    started = meta.get("started_at")
    offset = 0.0
    if isinstance(started, int | float):
        offset = round(started - timeline.start.timestamp(), 3)
    finished = "ended_at" in meta or not run.is_active
    return {
        "available": True,
        "offset": offset,
        "bytes": size,
        "fps": meta.get("fps"),
        "ended": meta.get("reason", ""),
        "finished": finished,
        "note": "" if finished else "The run is still being recorded: reload once it has ended to see all of it.",
    }


# --- the page ----------------------------------------------------------------------------


def _find(request: HttpRequest, sandbox_id: int, run_id: int) -> AgentRun | HttpResponse:
    run = AgentRun.objects.select_related("sandbox", "sandbox__owner", "started_by").filter(pk=run_id).first()
    if run is None or run.sandbox_id != sandbox_id:
        raise Http404("no such run")
    if not can_view(request.user, run.sandbox):
        return render(request, "namek/forbidden.html", status=403)
    return run


def replay_data(run: AgentRun, timeline: Timeline) -> dict[str, Any]:
    sandbox = run.sandbox
    return {
        "run": {
            "id": run.pk,
            "task": run.task,
            "status": run.status,
            "active": run.is_active,
            "result": run.result,
            "error": run.error,
            "steps": run.steps,
            "model": run.model_settings.get("model", "") if isinstance(run.model_settings, dict) else "",
            "started_by": run.started_by.get_username() if run.started_by else None,
            "created_at": run.created_at.isoformat(),
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "ended_at": run.ended_at.isoformat() if run.ended_at else None,
        },
        "sandbox": {"id": sandbox.pk, "name": sandbox.name, "backend": sandbox.backend},
        "start": timeline.start.isoformat(),
        "end": timeline.end.isoformat(),
        "duration": timeline.duration,
        "truncated": timeline.truncated,
        "items": timeline.items,
        "takeovers": timeline.takeovers,
        "terminals": timeline.terminals,
        "recording": recording_info(run, timeline, sandbox.backend),
        "exported": False,
    }


@login_required
@require_GET
def replay_page(request: HttpRequest, sandbox_id: int, run_id: int) -> HttpResponse:
    found = _find(request, sandbox_id, run_id)
    if isinstance(found, HttpResponse):
        return found
    timeline = build_timeline(found)
    data = replay_data(found, timeline)
    if data["recording"]["available"]:
        data["recording"]["url"] = reverse("replay-recording", args=(sandbox_id, run_id))
    context = {"run": found, "sandbox": found.sandbox, "data": data, "exported": False}
    return render(request, "namek/replay.html", context)


# --- the export --------------------------------------------------------------------------


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit
        self.skipped = 0

    def take(self, size: int) -> bool:
        if size > self.left:
            self.skipped += 1
            return False
        self.left -= size
        return True


def _data_url(content_type: str, content: bytes) -> str:
    return f"data:{content_type};base64,{base64.b64encode(content).decode()}"


def _read(name: str) -> bytes | None:
    try:
        with default_storage.open(name, "rb") as handle:
            return bytes(handle.read())
    except OSError:
        return None


def _export_shot(content: bytes) -> bytes | None:
    """A full screenshot as a JPEG at most EXPORT_SHOT_WIDTH wide (None if unreadable)."""
    try:
        with Image.open(io.BytesIO(content)) as opened:
            if opened.format == "JPEG" and opened.width <= EXPORT_SHOT_WIDTH:
                return content
            picture = opened.convert("RGB")
        if picture.width > EXPORT_SHOT_WIDTH:
            height = max(1, round(picture.height * EXPORT_SHOT_WIDTH / picture.width))
            picture = picture.resize((EXPORT_SHOT_WIDTH, height), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=EXPORT_JPEG_QUALITY, optimize=True)
        return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def inline_images(timeline_items: list[dict[str, Any]], events: dict[int, Event]) -> list[str]:
    """Replace the items' image URLs by data: URLs, within the caps; returns notes."""
    shots, thumbs = _Budget(EXPORT_MAX_IMAGE_BYTES), _Budget(EXPORT_MAX_THUMBNAIL_BYTES)
    for item in timeline_items:
        event = events.get(item["seq"])
        thumbnail = _read(event.thumbnail) if event is not None and event.thumbnail else None
        item["thumbnail"] = _data_url("image/jpeg", thumbnail) if thumbnail and thumbs.take(len(thumbnail)) else None
        screenshot = None
        if event is not None and event.screenshot and item["kind"] in EXPORT_SHOT_KINDS:
            content = _read(event.screenshot)
            screenshot = _export_shot(content) if content else None
            if screenshot is not None and not shots.take(len(screenshot)):
                screenshot = None
        item["screenshot"] = _data_url("image/jpeg", screenshot) if screenshot else None
        if event is not None and event.screenshot and not screenshot:
            item["screenshot_left_out"] = True
    notes = []
    if shots.skipped:
        notes.append(
            f"{shots.skipped} full screenshot{'s' if shots.skipped != 1 else ''} left out: the export keeps "
            f"{EXPORT_MAX_IMAGE_BYTES // (1024 * 1024)} MB of them (thumbnails remain)."
        )
    if thumbs.skipped:
        notes.append(f"{thumbs.skipped} thumbnails left out (over {EXPORT_MAX_THUMBNAIL_BYTES // (1024 * 1024)} MB).")
    return notes


def inline_recording(run: AgentRun, recording: dict[str, Any]) -> None:
    if not recording.get("available"):
        return
    path = recording_path(run.pk)
    size = recording.get("bytes", 0)
    if size > EXPORT_MAX_VIDEO_BYTES:
        recording.update(
            available=False,
            note=f"The screen recording ({size / (1024 * 1024):.1f} MB) is over the export's "
            f"{EXPORT_MAX_VIDEO_BYTES // (1024 * 1024)} MB cap: it was left out; watch it in Namek.",
        )
        return
    try:
        recording["url"] = _data_url("video/webm", path.read_bytes())
    except OSError:
        recording.update(available=False, note="The screen recording could not be read: it was left out.")


def _static(name: str, closing: str) -> str:
    text = (STATIC_DIR / name).read_text()
    if closing in text.lower():
        raise ValueError(f"{name} contains {closing}: it cannot be inlined")
    return mark_safe(text)  # our own file, checked above


def export_html(run: AgentRun, timeline: Timeline) -> str:
    data = replay_data(run, timeline)
    events = {
        e.seq: e
        for e in Event.objects.filter(sandbox_id=run.sandbox_id, seq__in=[i["seq"] for i in timeline.items]).only(
            "seq", "screenshot", "thumbnail"
        )
    }
    notes = inline_images(data["items"], events)
    inline_recording(run, data["recording"])
    exported_at = timezone.now()
    data["exported"] = True
    data["exported_at"] = exported_at.isoformat()
    data["notes"] = notes
    context = {
        "run": run,
        "sandbox": run.sandbox,
        "data": data,
        "exported": True,
        "exported_at": exported_at,
        "notes": notes,
        "css": _static("replay.css", "</style"),
        "js": _static("replay.js", "</script"),
    }
    return render_to_string("namek/replay_export.html", context)


@login_required
@require_GET
def replay_export(request: HttpRequest, sandbox_id: int, run_id: int) -> HttpResponse:
    found = _find(request, sandbox_id, run_id)
    if isinstance(found, HttpResponse):
        return found
    html = export_html(found, build_timeline(found))
    response = HttpResponse(html, content_type="text/html; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="run-{found.pk}-replay.html"'
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"
    return response


# --- the recording, with HTTP ranges -----------------------------------------------------

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """One ``bytes=a-b`` range as (first, last) inclusive; None: no (usable) range, serve
    everything; False: unsatisfiable (416)."""
    match = RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: the whole file is a valid answer
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        length = int(last)
        if length == 0:
            return False
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


def _chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        while length > 0:
            block = handle.read(min(CHUNK, length))
            if not block:
                return
            length -= len(block)
            yield block


async def _achunks(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    """The same, for Daphne: Django would read a synchronous iterator whole into memory
    before sending a byte of it under ASGI."""
    blocks = _chunks(path, start, length)
    try:
        while block := await asyncio.to_thread(next, blocks, b""):
            yield block
    finally:
        blocks.close()


@login_required
@require_GET
def replay_recording(request: HttpRequest, sandbox_id: int, run_id: int) -> HttpResponse:
    found = _find(request, sandbox_id, run_id)
    if isinstance(found, HttpResponse):
        return found
    path = recording_path(found.pk)
    try:
        size = path.stat().st_size
    except OSError:
        raise Http404("no recording of this run") from None
    wanted = parse_range(request.headers.get("Range", ""), size) if "Range" in request.headers else None
    if wanted is False:
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    start, end = wanted if isinstance(wanted, tuple) else (0, size - 1)
    length = max(0, end - start + 1)
    stream = _achunks if isinstance(request, ASGIRequest) else _chunks
    response = StreamingHttpResponse(stream(path, start, length), content_type="video/webm")
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["Cache-Control"] = "private, no-cache"
    response["X-Content-Type-Options"] = "nosniff"
    if isinstance(wanted, tuple):
        response.status_code = 206
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
    return response

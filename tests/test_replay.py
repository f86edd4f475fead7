"""The replay of a run (``viewer/replay.py``): its timeline built from rows, the page, the
self-contained export, the recording route with HTTP ranges; the screen recorder
(``sandboxes/recording.py``) against a small RFB server of our own and against a real
sandbox during a real agent run; the page and the exported file in Chromium.

Bad input tried: pages of runs one may not see, of another sandbox, or that do not exist;
agent text with markup; ranges that are malformed, past the end or from the end; a
recorder pointed at a socket that never answers, at no socket, with a bad frame rate;
a recorder killed with SIGKILL (its ffmpeg goes with it); a screen that goes away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import AsyncClient, Client
from PIL import Image

from sandboxes import recording
from sandboxes.models import AgentRun, ControlSpan, Event, Sandbox
from tests.cast import PASSWORD
from tests.live import ROOT, LiveNamek, processes_with, ready_sandbox
from viewer import replay

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def png(width: int = 640, height: int = 400, colour: str = "#3a86ff") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(autouse=True)
def own_dirs(settings: Any, tmp_path: Path) -> None:
    """Screenshots and run directories of each test in a directory of its own."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.DATA_DIR = tmp_path / "data"


class Log:
    """Events written as rows, at chosen moments."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.seq = 0

    def add(self, kind: str, when: float, text: str = "", /, *, source: str = "agent", actor: str = "", **data: Any):  # type: ignore[no-untyped-def]
        shot = data.pop("shot", None)
        self.seq += 1
        names = ("", "")
        if shot is not None:
            full = default_storage.save(f"screenshots/{self.sandbox.pk}/s{self.seq}.png", ContentFile(shot))
            thumb = io.BytesIO()
            Image.open(io.BytesIO(shot)).convert("RGB").resize((320, 200)).save(thumb, "JPEG")
            small = default_storage.save(
                f"screenshots/{self.sandbox.pk}/s{self.seq}-thumb.jpg", ContentFile(thumb.getvalue())
            )
            names = (full, small)
        event = Event.objects.create(
            sandbox=self.sandbox,
            seq=self.seq,
            at=at(when),
            kind=kind,
            source=source,
            actor=actor,
            text=text,
            data=data,
            screenshot=names[0],
            thumbnail=names[1],
        )
        Sandbox.objects.filter(pk=self.sandbox.pk).update(event_seq=self.seq)
        return event


def make_run(
    sandbox: Sandbox, *, task: str = "Request a quote", ended: float | None = 60, status: str = "done"
) -> AgentRun:
    run = AgentRun.objects.create(
        sandbox=sandbox,
        task=task,
        status=status,
        token_digest=os.urandom(16).hex(),
        model_settings={"model": "scripted"},
    )
    AgentRun.objects.filter(pk=run.pk).update(
        created_at=at(0), started_at=at(1), ended_at=at(ended) if ended is not None else None
    )
    run.refresh_from_db()
    return run


@pytest.fixture
def story(make_sandbox, cast: dict) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A run of 60 s with two steps, a take-over by bob with a note, three terminal
    sessions (one begun before the run, one still open), failures, and events outside it."""
    box = make_sandbox()
    run = make_run(box)
    other = AgentRun.objects.create(sandbox=box, task="another", status="failed", token_digest="x" * 32)
    log = Log(box)
    log.add("person.note", -30, "before the run", source="person", actor="owner")
    log.add("terminal.opened", -10, "Terminal opened", source="person", actor="alice", readonly=False)
    log.add("agent.started", 1, "Agent started: Request a quote", run=run.pk, task=run.task, model="scripted")
    log.add("agent.step", 5, "Open the shop", run=run.pk, step=1, goal="Open the shop", url="http://x/demo/",
            actions=[{"name": "navigate", "params": {"url": "/demo/"}}], shot=png())  # fmt: skip
    log.add("agent.log", 8, "Error: the element is not there", run=run.pk)
    log.add("control.requested", 10, "bob asked to take over", source="person", actor="bob")
    log.add(
        "control.granted",
        11,
        "bob took over",
        source="person",
        actor="bob",
        span=1,
        run=run.pk,
        shot=png(colour="#f00"),
    )
    log.add("terminal.opened", 12, "Terminal opened", source="person", actor="bob", readonly=False)
    log.add("terminal.closed", 20, "Terminal closed after 30.0 s", source="person", actor="alice", readonly=False,
            seconds=30.0, code=1000)  # fmt: skip
    log.add("terminal.closed", 25, "Terminal closed after 13.0 s", source="person", actor="bob", readonly=False,
            seconds=13.0, code=1000)  # fmt: skip
    log.add(
        "control.handed_back", 30, "bob handed back", source="person", actor="bob", note="<b>use blue</b>", run=run.pk
    )
    log.add("control.refused", 31, "carol was refused", source="person", actor="carol", reason="bob is driving")
    log.add(
        "agent.step", 35, "Fill the form", run=run.pk, step=2, goal="Fill the form", error="no such field", shot=png()
    )
    log.add("terminal.opened", 40, "Terminal opened (read-only)", source="person", actor="carol", readonly=True)
    log.add("agent.step", 50, "another run's step", run=other.pk, step=1)
    log.add("agent.failed", 60.5, "Agent failed: no such field", run=run.pk, error="no such field", steps=2)
    log.add("sandbox.stopping", 62, "Stopping", source="person", actor="owner", reason="")
    log.add("person.note", 70, "after the run", source="person", actor="owner")
    span = ControlSpan.objects.create(sandbox=box, username="bob", run=run, note="<b>use blue</b>", keys=5, pointer=2)
    ControlSpan.objects.filter(pk=span.pk).update(
        requested_at=at(10), granted_at=at(11), ended_at=at(30), ended="handed_back"
    )
    earlier = ControlSpan.objects.create(sandbox=box, username="dave", note="long ago")
    ControlSpan.objects.filter(pk=earlier.pk).update(requested_at=at(-50), granted_at=at(-49), ended_at=at(-5))
    return {"sandbox": box, "run": run, "other": other}


# --- the timeline ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_timeline_has_the_runs_events_in_order_with_offsets(story: dict[str, Any]) -> None:
    timeline = replay.build_timeline(story["run"])
    items = timeline.items
    assert [i["seq"] for i in items] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16]
    assert [i["offset"] for i in items][:3] == [1.0, 5.0, 8.0]
    assert timeline.duration == 60.5  # the end's own event comes just after ended_at
    step = items[1]
    assert (step["kind"], step["category"], step["step"], step["actor"]) == ("agent.step", "step", 1, "")
    assert step["detail"]["goal"] == "Open the shop" and step["detail"]["actions"] == ['navigate {"url": "/demo/"}']
    sandbox = story["sandbox"].pk
    assert step["screenshot"] == f"/api/sandboxes/{sandbox}/events/4/screenshot"
    assert step["thumbnail"] == f"/api/sandboxes/{sandbox}/events/4/thumbnail"
    assert items[0]["screenshot"] is None
    categories = {i["seq"]: i["category"] for i in items}
    assert (categories[6], categories[8], categories[3]) == ("control", "terminal", "agent")


@pytest.mark.django_db
def test_failures_are_marked(story: dict[str, Any]) -> None:
    items = replay.build_timeline(story["run"]).items
    assert {i["seq"] for i in items if i["failure"]} == {5, 12, 13, 16}


@pytest.mark.django_db
def test_takeover_spans_say_who_and_the_note(story: dict[str, Any]) -> None:
    takeovers = replay.build_timeline(story["run"]).takeovers
    assert len(takeovers) == 1, takeovers  # dave's span ended before the run
    span = takeovers[0]
    assert (span["user"], span["note"], span["start"], span["granted"], span["end"]) == (
        "bob",
        "<b>use blue</b>",
        10,
        11,
        30,
    )
    assert (span["open"], span["ended"], span["seconds"], span["inputs"]["keys"]) == (False, "handed_back", 19.0, 5)


@pytest.mark.django_db
def test_terminal_sessions_pair_opens_with_closes(story: dict[str, Any]) -> None:
    sessions = replay.build_timeline(story["run"]).terminals
    found = [(s["user"], s["readonly"], s["start"], s["end"], s["open"]) for s in sessions]
    assert found == [
        ("alice", False, -10.0, 20.0, False),  # begun before the run: drawn from its start
        ("bob", False, 12.0, 25.0, False),
        ("carol", True, 40.0, 60.5, True),  # never closed: open to the end
    ]


@pytest.mark.django_db
def test_an_active_run_ends_now_and_an_empty_one_is_empty(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    run = make_run(make_sandbox(), ended=None, status="running")
    timeline = replay.build_timeline(run, now=at(42))
    assert (timeline.duration, timeline.items, timeline.takeovers, timeline.terminals) == (42, [], [], [])


# --- the page --------------------------------------------------------------------------------


def login(who: str) -> Client:
    client = Client()
    assert client.login(username=who, password=PASSWORD)
    return client


def page_url(run: AgentRun, what: str = "") -> str:
    return f"/sandboxes/{run.sandbox_id}/runs/{run.pk}/replay/{what}"


def replay_json(html: str) -> dict[str, Any]:
    found = re.search(r'<script id="replay-data" type="application/json">(.*?)</script>', html, re.S)
    assert found, "the page carries its data as json_script"
    return json.loads(found.group(1))


@pytest.mark.django_db
def test_the_page_is_for_those_who_may_see_the_sandbox(story: dict[str, Any]) -> None:
    run = story["run"]
    for who in ("owner", "viewer", "operator", "staff"):
        response = login(who).get(page_url(run))
        assert response.status_code == 200, who
    assert login("outsider").get(page_url(run)).status_code == 403
    anonymous = Client().get(page_url(run))
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    owner = login("owner")
    assert owner.get(f"/sandboxes/{run.sandbox_id + 1000}/runs/{run.pk}/replay/").status_code == 404
    assert owner.get(f"/sandboxes/{run.sandbox_id}/runs/{run.pk + 1000}/replay/").status_code == 404
    for what in ("export", "recording"):
        assert login("outsider").get(page_url(run, what)).status_code == 403
    assert owner.post(page_url(run)).status_code == 405


@pytest.mark.django_db
def test_the_page_escapes_what_the_agent_wrote(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    run = make_run(make_sandbox(), task="<script>alert('task')</script>")
    AgentRun.objects.filter(pk=run.pk).update(result="<img src=x onerror=alert(1)>")
    Log(run.sandbox).add("agent.step", 3, "<script>alert('step')</script>", run=run.pk, step=1, goal="<i>goal</i>")
    html = login("owner").get(page_url(run)).content.decode()
    assert "<script>alert(" not in html and "<img src=x" not in html and "<i>goal" not in html
    assert "&lt;script&gt;alert(&#x27;task&#x27;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    data = replay_json(html)
    assert data["items"][0]["text"] == "<script>alert('step')</script>"  # data; replay.js sets it as text
    assert data["run"]["task"] == "<script>alert('task')</script>"


@pytest.mark.django_db
def test_the_page_of_a_run_still_going_says_so(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    run = make_run(make_sandbox(), ended=None, status="running")
    html = login("owner").get(page_url(run)).content.decode()
    assert "The run is still going" in html
    assert replay_json(html)["run"]["active"] is True


@pytest.mark.django_db
def test_the_page_carries_the_timeline(story: dict[str, Any]) -> None:
    html = login("owner").get(page_url(story["run"])).content.decode()
    data = replay_json(html)
    assert len(data["items"]) == 13 and data["duration"] == 60.5
    assert data["takeovers"][0]["note"] == "<b>use blue</b>"
    assert data["recording"] == {"available": False, "note": "No recording of this run."}
    assert 'src="/static/namek/replay.js"' in html


# --- the export ------------------------------------------------------------------------------


class References(HTMLParser):
    """Every attribute of the document that makes a browser fetch something."""

    FETCHING = {"src", "href", "action", "poster", "srcset", "data", "formaction", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in self.FETCHING and value is not None:
                self.found.append((tag, name, value))


def external(value: str) -> bool:
    value = value.strip().lower()
    return value.startswith(("http:", "https:", "//", "/", "ws:", "wss:", "ftp:", "file:")) or (
        not value.startswith(("data:", "#")) and value != ""
    )


def export(client: Client, run: AgentRun) -> str:
    response = client.get(page_url(run, "export"))
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-replay.html"'
    assert response["Content-Type"].startswith("text/html")
    return response.content.decode()


@pytest.mark.django_db
def test_the_export_is_one_file_that_asks_nothing_of_any_server(story: dict[str, Any]) -> None:
    html = export(login("owner"), story["run"])
    parser = References()
    parser.feed(html)
    assert [r for r in parser.found if external(r[2])] == []
    data = replay_json(html)
    markup = re.sub(r"<script>.*?</script>", "", html, flags=re.S)  # our own code, checked on its own
    assert "/static/" not in markup and "/api/" not in markup and "url(" not in markup
    assert "<script src" not in html and 'rel="stylesheet"' not in html
    urls = [i[k] for i in data["items"] for k in ("screenshot", "thumbnail") if i[k]]
    assert urls and all(u.startswith("data:image/") for u in urls)
    assert "default-src 'none'" in html  # and the page's own policy forbids any request
    assert data["exported"] is True
    steps = [i for i in data["items"] if i["kind"] == "agent.step"]
    assert len(steps) == 2
    for step in steps:
        assert step["screenshot"].startswith("data:image/jpeg;base64,")
        assert step["thumbnail"].startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(step["screenshot"].split(",", 1)[1])))
        assert (picture.format, picture.size) == ("JPEG", (640, 400))
    granted = next(i for i in data["items"] if i["kind"] == "control.granted")
    assert granted["screenshot"].startswith("data:image/jpeg;base64,")
    # The CSS and the JS are in it.
    assert "replay-lane-track" in html and "function clock(" in html


@pytest.mark.django_db
def test_the_export_leaves_out_screenshots_past_its_cap(story: dict[str, Any], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    one = len(replay._export_shot(png()) or b"")
    monkeypatch.setattr(replay, "EXPORT_MAX_IMAGE_BYTES", one + 10)
    html = export(login("owner"), story["run"])
    data = replay_json(html)
    shots = [i for i in data["items"] if i["kind"] in replay.EXPORT_SHOT_KINDS and i["thumbnail"]]
    assert [bool(i["screenshot"]) for i in shots] == [True, False, False]
    assert all(i.get("screenshot_left_out") for i in shots[1:])
    assert all(i["thumbnail"].startswith("data:image/jpeg") for i in shots)
    assert "2 full screenshots left out" in html


@pytest.mark.django_db
def test_a_large_screenshot_is_shrunk_for_the_export(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    run = make_run(make_sandbox())
    Log(run.sandbox).add("agent.step", 3, "big", run=run.pk, step=1, shot=png(3200, 2000))
    data = replay_json(export(login("owner"), run))
    picture = Image.open(io.BytesIO(base64.b64decode(data["items"][0]["screenshot"].split(",", 1)[1])))
    assert picture.size == (replay.EXPORT_SHOT_WIDTH, 1000)


# --- the recording route ---------------------------------------------------------------------


def put_recording(run: AgentRun, content: bytes, started: float = 2.5) -> Path:
    path = replay.recording_path(run.pk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    info = {"started_at": at(started).timestamp(), "ended_at": at(60).timestamp(), "fps": 5, "reason": "stopped"}
    path.with_name("screen.json").write_text(json.dumps(info))
    return path


@pytest.mark.django_db
def test_the_recording_is_served_with_ranges(story: dict[str, Any]) -> None:
    run = story["run"]
    owner = login("owner")
    assert owner.get(page_url(run, "recording")).status_code == 404
    content = bytes(range(256)) * 4
    put_recording(run, content)
    whole = owner.get(page_url(run, "recording"))
    assert whole.status_code == 200 and b"".join(whole.streaming_content) == content
    assert (whole["Content-Type"], whole["Accept-Ranges"], whole["Content-Length"]) == ("video/webm", "bytes", "1024")
    for header, status, expected, content_range in [
        ("bytes=10-19", 206, content[10:20], "bytes 10-19/1024"),
        ("bytes=1000-", 206, content[1000:], "bytes 1000-1023/1024"),
        ("bytes=-4", 206, content[-4:], "bytes 1020-1023/1024"),
        ("bytes=1020-5000", 206, content[1020:], "bytes 1020-1023/1024"),
        ("bytes=0-", 206, content, "bytes 0-1023/1024"),
    ]:
        response = owner.get(page_url(run, "recording"), HTTP_RANGE=header)
        assert response.status_code == status, header
        assert b"".join(response.streaming_content) == expected, header
        assert response["Content-Range"] == content_range
        assert response["Content-Length"] == str(len(expected))
    for header in ("bytes=2000-", "bytes=20-10", "bytes=-0"):
        response = owner.get(page_url(run, "recording"), HTTP_RANGE=header)
        assert response.status_code == 416 and response["Content-Range"] == "bytes */1024", header
    for header in ("bytes=1-2,5-6", "items=0-1", "nonsense"):  # not one byte range: the whole file
        response = owner.get(page_url(run, "recording"), HTTP_RANGE=header)
        assert response.status_code == 200 and response["Content-Length"] == "1024", header


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_recording_streams_asynchronously(story: dict[str, Any]) -> None:
    """Django reads a synchronous iterator whole into memory under ASGI (Daphne)."""
    run = story["run"]
    content = os.urandom(3 * replay.CHUNK + 5)
    put_recording(run, content)
    client = AsyncClient()
    await client.aforce_login(await get_user_model().objects.aget(username="owner"))
    response = await client.get(page_url(run, "recording"), headers={"Range": "bytes=5-"})
    assert response.status_code == 206 and response.is_async
    assert b"".join([part async for part in response.streaming_content]) == content[5:]


@pytest.mark.django_db
def test_the_page_lines_the_recording_up_with_the_timeline(story: dict[str, Any]) -> None:
    run = story["run"]
    put_recording(run, b"\x1a\x45\xdf\xa3" + b"\0" * 100, started=2.5)
    data = replay_json(login("owner").get(page_url(run)).content.decode())
    recording_info = data["recording"]
    assert recording_info["available"] and recording_info["offset"] == 2.5
    assert recording_info["url"] == page_url(run, "recording")
    exported = replay_json(export(login("owner"), run))["recording"]
    assert exported["url"].startswith("data:video/webm;base64,")
    assert base64.b64decode(exported["url"].split(",", 1)[1]).startswith(b"\x1a\x45\xdf\xa3")


@pytest.mark.django_db
def test_a_recording_over_the_export_cap_is_left_out_with_a_note(story: dict[str, Any], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(replay, "EXPORT_MAX_VIDEO_BYTES", 50)
    put_recording(story["run"], b"\0" * 100)
    html = export(login("owner"), story["run"])
    exported = replay_json(html)["recording"]
    assert exported["available"] is False and "over the export's" in exported["note"]
    assert "url" not in exported and "data:video/webm;base64," not in html


@pytest.mark.django_db
def test_sandboxes_on_kubernetes_say_no_recording(story: dict[str, Any]) -> None:
    Sandbox.objects.filter(pk=story["sandbox"].pk).update(backend="kubernetes")
    data = replay_json(login("owner").get(page_url(story["run"])).content.decode())
    assert data["recording"]["available"] is False and "No recording" in data["recording"]["note"]


# --- the recorder, against a small RFB server of our own ---------------------------------------


class FakeScreen:
    """An RFB 3.8 server (security None) on a UNIX socket, in a thread: a WIDTHxHEIGHT
    screen whose colour changes with every update, sent as Raw with a CopyRect."""

    def __init__(self, path: Path, width: int = 64, height: int = 48) -> None:
        self.path, self.width, self.height = path, width, height
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.updates = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> FakeScreen:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)

    async def _main(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        self.ready.set()
        await self.stopping.wait()
        server.close()
        self._close_all()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _close_all(self) -> None:
        for writer in self.writers:
            writer.close()

    def close(self) -> None:
        """The screen goes away: every client's connection closes."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._close_all)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x01")
            await reader.readexactly(1)
            writer.write(struct.pack(">I", 0))
            await reader.readexactly(1)  # ClientInit
            pixel_format = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            writer.write(struct.pack(">HH", self.width, self.height) + pixel_format + struct.pack(">I", 4) + b"fake")
            while True:
                (kind,) = await reader.readexactly(1)
                if kind == 0:
                    await reader.readexactly(19)
                elif kind == 2:
                    (count,) = struct.unpack(">xH", await reader.readexactly(3))
                    await reader.readexactly(4 * count)
                elif kind == 3:
                    await reader.readexactly(9)
                    await asyncio.sleep(0.03)
                    self.updates += 1
                    shade = (self.updates * 37) % 256
                    w, h = self.width, self.height
                    raw = bytes([shade, 255 - shade, 80, 0]) * (w * h)
                    writer.write(struct.pack(">BxH", 0, 2))
                    writer.write(struct.pack(">HHHHi", 0, 0, w, h, 0) + raw)
                    writer.write(struct.pack(">HHHHi", 0, 0, 8, 8, 1) + struct.pack(">HH", 8, 8))
                    await writer.drain()
                else:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def recorder(out: Path, screen: str, *extra: str, password_file: Path | None = None) -> subprocess.Popen[str]:
    """The recorder as the supervisor runs it; the password from stdin unless a file is given."""
    source = str(password_file) if password_file else "-"
    return subprocess.Popen(
        [sys.executable, "-m", "sandboxes.recording", "--screen", screen, "--password-file", source, "--out", str(out),
         *extra],
        cwd=ROOT,
        stdin=subprocess.DEVNULL if password_file else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen[str], password: str = "pw", timeout: float = 30) -> tuple[int, str]:
    _, stderr = process.communicate(None if process.stdin is None else password + "\n", timeout=timeout)
    return process.returncode, stderr


def ffprobe(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration,format_name:stream=codec_name,width,height",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return json.loads(result.stdout)


def ffmpegs_writing(out: Path) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(out) in (process.info["cmdline"] or []) and "ffmpeg" in (process.info["cmdline"] or [""])[0]:
                found.append(process.pid)
    return found


needs_ffmpeg = pytest.mark.skipif(not Path(recording.FFMPEG).exists(), reason="Debian's ffmpeg is not installed")


def test_the_recorder_imports_no_django() -> None:
    code = "import sys, sandboxes.recording; print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_framebuffer_takes_raw_and_copyrect_and_refuses_rectangles_outside() -> None:
    frame = recording.Framebuffer(4, 3)
    frame.put(1, 1, 2, 1, b"\x01\x02\x03\x00" * 2)
    assert frame.data[(1 * 4 + 1) * 4 : (1 * 4 + 3) * 4] == b"\x01\x02\x03\x00" * 2
    frame.copy_rect(0, 0, 2, 1, source=(1, 1))
    assert frame.data[:8] == b"\x01\x02\x03\x00" * 2
    with pytest.raises(recording.rfb.RFBError, match="outside"):
        frame.put(3, 0, 2, 1, b"\0" * 8)


@needs_ffmpeg
def test_the_recorder_records_until_sigterm_and_finishes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "screen.webm"
    with FakeScreen(tmp_path / "vnc.sock") as screen:
        (tmp_path / "pw").write_text("pw\n")
        process = recorder(out, f"unix:{screen.path}", "--fps", "10", password_file=tmp_path / "pw")
        deadline = time.monotonic() + 20
        while not out.with_suffix(".json").exists():
            assert time.monotonic() < deadline and process.poll() is None, finish(process)
            time.sleep(0.05)
        time.sleep(2.5)
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=30)[1]
    assert process.returncode == 0, stderr
    assert "ended: stopped" in stderr
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["reason"] == "stopped" and info["fps"] == 10 and (info["width"], info["height"]) == (64, 48)
    assert info["ended_at"] - info["started_at"] > 2
    probed = ffprobe(out)
    assert probed["streams"][0]["codec_name"] == "vp8" and "webm" in probed["format"]["format_name"]
    assert float(probed["format"]["duration"]) > 2
    assert screen.updates > 10, "incremental updates were asked for, paced at the frame rate"


@needs_ffmpeg
def test_the_recorder_stops_when_the_screen_goes_away_or_time_is_up(tmp_path: Path) -> None:
    out = tmp_path / "gone.webm"
    with FakeScreen(tmp_path / "vnc.sock") as screen:
        process = recorder(out, f"unix:{screen.path}")
        threading.Timer(2.0, screen.close).start()
        code, stderr = finish(process)
    assert code == 0, stderr
    assert "the screen went away" in stderr and json.loads(out.with_suffix(".json").read_text())["frames"] >= 5
    assert float(ffprobe(out)["format"]["duration"]) > 1
    timed = tmp_path / "timed.webm"
    with FakeScreen(tmp_path / "vnc2.sock") as screen:
        code, stderr = finish(recorder(timed, f"unix:{screen.path}", "--max-seconds", "1.5"))
    assert code == 0 and "the time limit (1.5 s)" in stderr, stderr
    assert 1.2 <= float(ffprobe(timed)["format"]["duration"]) <= 2.0


@needs_ffmpeg
def test_a_killed_recorder_takes_its_ffmpeg_with_it(tmp_path: Path) -> None:
    out = tmp_path / "killed.webm"
    with FakeScreen(tmp_path / "vnc.sock") as screen:
        (tmp_path / "pw").write_text("pw")
        process = recorder(out, f"unix:{screen.path}", password_file=tmp_path / "pw")
        deadline = time.monotonic() + 20
        while not ffmpegs_writing(out):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.kill()
        finish(process)
        deadline = time.monotonic() + 10
        while ffmpegs_writing(out):
            assert time.monotonic() < deadline, "ffmpeg outlived its recorder"
            time.sleep(0.05)


def test_a_recorder_pointed_at_a_silent_socket_fails_clearly_and_starts_no_ffmpeg(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    out = tmp_path / "silent.webm"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)  # never accepts, never answers
        started = time.monotonic()
        code, stderr = finish(recorder(out, f"unix:{path}", "--connect-timeout", "1"))
        assert time.monotonic() - started < 15
    assert code == 1
    assert f"recording: the screen at unix:{path} did not answer within 1 s" in stderr
    assert not out.exists() and ffmpegs_writing(out) == []
    code, stderr = finish(recorder(out, f"unix:{tmp_path / 'none.sock'}"))
    assert code == 1 and "cannot record the screen" in stderr and "No such file" in stderr
    code, stderr = finish(recorder(out, "vnc://somewhere"))
    assert code == 2 and "give unix:/path/to/socket or tcp:host:port" in stderr
    code, stderr = finish(recorder(out, f"unix:{path}", "--fps", "0"))
    assert code == 2 and "must be above 0" in stderr
    assert not out.exists()


# --- for real: a run on a live sandbox, recorded; the page and the export in Chromium ----------


def start_run(namek: LiveNamek, sandbox_id: int, script: str) -> dict[str, Any]:
    status, run = namek.api("POST", f"/api/sandboxes/{sandbox_id}/runs", body={"script": script, "task": "replay me"})
    assert status == 201, run
    return run


def wait_run(namek: LiveNamek, run_id: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = namek.api("GET", f"/api/runs/{run_id}")[1]
        if run["status"] in ("done", "failed"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not end within {timeout} s")


SCRIPT = "steps:\n  - navigate: /demo/\n  - wait: {seconds: 3}\n  - navigate: /demo/quote\n  - done: {text: ok}\n"


@pytest.fixture(scope="module")
def recorded_run(live_namek: LiveNamek) -> dict[str, Any]:
    """A short scripted run on a live sandbox, its recording finished; the sandbox is
    deleted before the tests look: a replay outlives its sandbox."""
    with ready_sandbox(live_namek, name="replay") as box:
        run = wait_run(live_namek, start_run(live_namek, box["id"], SCRIPT)["id"])
        assert run["status"] == "done", run
        info = live_namek.data_dir / "runs" / str(run["id"]) / "screen.json"
        deadline = time.monotonic() + 20
        while "ended_at" not in (json.loads(info.read_text()) if info.exists() else {}):
            assert time.monotonic() < deadline, "the recorder did not finish after its run"
            time.sleep(0.2)
        return {"run": run, "sandbox": box}


@pytest.mark.processes
@needs_ffmpeg
def test_a_real_run_is_recorded_within_its_bounds(live_namek: LiveNamek, recorded_run: dict[str, Any]) -> None:
    run = recorded_run["run"]
    folder = live_namek.data_dir / "runs" / str(run["id"])
    video = folder / "screen.webm"
    probed = ffprobe(video)
    assert probed["streams"][0]["codec_name"] == "vp8"
    assert (probed["streams"][0]["width"], probed["streams"][0]["height"]) == (1280, 800)
    assert float(probed["format"]["duration"]) > 1
    assert 0 < video.stat().st_size < recording.MAX_BYTES
    info = json.loads((folder / "screen.json").read_text())
    assert info["reason"] == "stopped", info  # asked to finish when the runner ended
    assert processes_with(f"NAMEK_SANDBOX_ID=run-{run['id']}-screen") == [], "the recorder ended with its run"


@pytest.mark.processes
@needs_ffmpeg
def test_deleting_the_sandbox_mid_run_finishes_the_recording(live_namek: LiveNamek) -> None:
    created = live_namek.create_sandbox(name="short replay")
    script = "steps:\n  - navigate: /demo/\n  - wait: {seconds: 30}\n  - done: {text: too late}\n"
    run = start_run(live_namek, created["id"], script)
    folder = live_namek.data_dir / "runs" / str(run["id"])
    deadline = time.monotonic() + 60
    while not (folder / "screen.json").exists():
        assert time.monotonic() < deadline, "the recording did not start"
        time.sleep(0.2)
    time.sleep(2)
    live_namek.delete_sandbox(created["id"])
    info = json.loads((folder / "screen.json").read_text())
    assert info["reason"] == "stopped" and "ended_at" in info, info  # finished before the screen went
    assert float(ffprobe(folder / "screen.webm")["format"]["duration"]) > 1
    assert processes_with(f"NAMEK_SANDBOX_ID=run-{run['id']}-screen") == []


async def log_in(page: Any, base_url: str) -> None:
    await page.goto(base_url + "/login/")
    await page.fill("input[name=username]", "owner")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(base_url + "/")


async def open_replay(browser: Any, namek: LiveNamek, recorded: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """A logged-in context with the run's replay page open and ready."""
    context = await browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, namek.base_url)
    await page.goto(f"{namek.base_url}/sandboxes/{recorded['sandbox']['id']}/runs/{recorded['run']['id']}/replay/")
    await page.wait_for_selector("#replay[data-ready=true]")
    return context, page, errors


def shots_dir() -> Path | None:
    """NAMEK_REPLAY_SHOTS=<dir>: keep the tests' screenshots of the replay there."""
    found = os.environ.get("NAMEK_REPLAY_SHOTS")
    return Path(found) if found else None


@pytest.mark.processes
@pytest.mark.browser
@needs_ffmpeg
async def test_the_replay_page_scrubs_to_a_step_beside_the_recording(
    live_namek: LiveNamek, recorded_run: dict[str, Any], browser: Any
) -> None:
    context, page, errors = await open_replay(browser, live_namek, recorded_run)
    assert await page.locator(".replay-item.category-step").count() >= 3
    # Scrub to the last step with the range input, as a person dragging it would.
    data = json.loads(await page.text_content("#replay-data") or "{}")
    last = [i for i in data["items"] if i["kind"] == "agent.step"][-1]
    await page.eval_on_selector(
        "#replay-scrub",
        "(input, value) => { input.value = value; input.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(round(last["offset"] * 1000) + 100),
    )
    await page.wait_for_function(
        "seq => document.getElementById('replay-image').dataset.seq === String(seq)", arg=last["seq"]
    )
    await page.wait_for_function("document.getElementById('replay-image').naturalWidth > 0")
    assert await page.locator(".replay-item.is-current").get_attribute("data-kind") == "agent.step"
    # The recording beside it shows the same moment.
    await page.wait_for_function("document.getElementById('replay-video').readyState >= 1", timeout=15000)
    expected = last["offset"] + 0.1 - data["recording"]["offset"]
    await page.wait_for_function(
        "t => Math.abs(document.getElementById('replay-video').currentTime - t) < 0.5", arg=expected
    )
    if shots_dir():
        await page.screenshot(path=str(shots_dir() / "replay-page.png"))  # type: ignore[operator]
    # Keys: Home, then → goes to the first event after the start; space plays.
    await page.keyboard.press("Home")
    assert await page.eval_on_selector("#replay-scrub", "i => i.value") == "0"
    await page.keyboard.press("ArrowRight")
    assert float(await page.eval_on_selector("#replay-scrub", "i => i.value")) > 0
    await page.keyboard.press("Space")
    await page.wait_for_function("document.getElementById('replay').dataset.playing === 'true'")
    before = float(await page.eval_on_selector("#replay-scrub", "i => i.value"))
    await page.wait_for_function("v => Number(document.getElementById('replay-scrub').value) > v + 300", arg=before)
    await page.keyboard.press("Space")
    assert await page.get_attribute("#replay", "data-playing") == "false"
    assert errors == []
    await context.close()


@pytest.mark.processes
@pytest.mark.browser
@needs_ffmpeg
async def test_the_exported_replay_opens_from_disk_with_no_server(
    live_namek: LiveNamek, recorded_run: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    context, page, errors = await open_replay(browser, live_namek, recorded_run)
    steps = await page.locator(".replay-item.category-step").count()
    async with page.expect_download() as download_info:
        await page.click("#replay-export")
    download = await download_info.value
    assert download.suggested_filename == f"run-{recorded_run['run']['id']}-replay.html"
    exported = tmp_path / download.suggested_filename
    await download.save_as(exported)
    await context.close()

    # A context where nothing but file: URLs may load, and we note what was asked.
    offline = await browser.new_context(viewport={"width": 1500, "height": 1000})
    asked: list[str] = []

    async def only_files(route: Any) -> None:
        asked.append(route.request.url)
        await (route.continue_() if route.request.url.startswith("file:") else route.abort())

    await offline.route("**/*", only_files)
    page = await offline.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(exported.as_uri())
    await page.wait_for_selector("#replay[data-ready=true]")
    assert await page.locator(".replay-item.category-step").count() == steps
    await page.wait_for_function("document.getElementById('replay-image').naturalWidth > 0")
    assert (await page.get_attribute("#replay-image", "src") or "").startswith("data:image/jpeg;base64,")
    await page.keyboard.press("End")
    await page.wait_for_function("document.getElementById('replay-video').readyState >= 1", timeout=15000)
    if shots_dir():
        await page.screenshot(path=str(shots_dir() / "replay-export.png"))  # type: ignore[operator]
    assert [u for u in asked if not u.startswith("file:")] == []
    assert errors == []
    await offline.close()

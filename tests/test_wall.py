"""The wall: the thumbnail hub (one VNC client and one encode per sandbox and frame,
whatever the audience), its RFB client, the /ws/wall/ socket (who sees what, captions,
flow control), the page, and the kiosk in a real browser with three agents running.

Bad input tried: anonymous and foreign-origin sockets, a share link to one sandbox on the
wall socket, text that is not an ack, a binary frame, an ack of nothing in flight, an
oversized frame; a VNC server that breaks mid-stream; an unknown share token on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import Client
from PIL import Image
from playwright.async_api import Browser

from namek_web.asgi import application
from sandboxes import events, services
from sandboxes.backends.base import Endpoint, ScreenTarget
from sandboxes.models import AgentRun
from tests.live import LiveNamek, ready_sandbox
from tests.test_e2e_browser import log_in
from viewer import wall
from viewer.closecodes import Close
from viewer.consumers.wall import WallConsumer

ORIGIN = "http://127.0.0.1:8000"


# --- a frame source that the test drives ---------------------------------------------------------


def solid(width: int, height: int, bgrx: bytes) -> wall.Frame:
    return wall.Frame(width, height, bgrx * (width * height))


class FakeSource:
    """Frames put in ``frames`` come out of ``update`` (None: an update that changed nothing;
    an exception instance: the connection breaks)."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    async def update(self) -> wall.Frame | None:
        item = await self.frames.get()
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self.closed = True


class Sources:
    """The hub's source factory: one FakeSource per connection, kept for the test."""

    def __init__(self) -> None:
        self.opened: dict[int, list[FakeSource]] = {}
        self.arrived = asyncio.Event()

    async def __call__(self, sandbox_id: int) -> FakeSource:
        source = FakeSource()
        self.opened.setdefault(sandbox_id, []).append(source)
        self.arrived.set()
        return source

    async def wait(self, sandbox_id: int, count: int = 1) -> FakeSource:
        async with asyncio.timeout(5):
            while len(self.opened.get(sandbox_id, [])) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.opened[sandbox_id][count - 1]


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, frame: wall.Frame) -> bytes:
        self.calls += 1
        return wall.encode_thumbnail(frame)


class Collector:
    """A hub subscriber that keeps what it was handed."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.got = asyncio.Event()

    def thumbnail(self, sandbox_id: int, frame: bytes) -> None:
        self.frames.append((sandbox_id, frame))
        self.got.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.frames) < count:
                self.got.clear()
                await self.got.wait()


@contextlib.asynccontextmanager
async def fake_hub(**kwargs: Any) -> AsyncIterator[tuple[wall.ThumbnailHub, Sources, CountingEncoder]]:
    """This loop's hub, reading fake sources (what the consumers get from wall.thumbnails())."""
    sources, encoder = Sources(), CountingEncoder()
    hub = wall.ThumbnailHub(sources, encoder, rate=kwargs.pop("rate", 100.0), grace=kwargs.pop("grace", 0.1))
    loop = asyncio.get_running_loop()
    wall._hubs[loop] = hub
    try:
        yield hub, sources, encoder
    finally:
        await hub.close()
        wall._hubs.pop(loop, None)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


# --- the hub ------------------------------------------------------------------------------------


async def test_every_subscriber_gets_the_same_bytes_object_from_one_encode() -> None:
    async with fake_hub() as (hub, sources, encoder):
        watchers = [Collector() for _ in range(10)]
        for watcher in watchers:
            hub.subscribe(7, watcher)
        source = await sources.wait(7)
        assert len(sources.opened[7]) == 1, "one VNC connection for every subscriber"
        for number in range(3):
            await source.frames.put(solid(64, 40, bytes([number * 80, 0, 0, 0])))
            for watcher in watchers:
                await watcher.wait(number + 1)
        assert encoder.calls == 3, "one encode per frame, not per subscriber"
        for number in range(3):
            first = watchers[0].frames[number][1]
            assert all(w.frames[number][1] is first for w in watchers), "the same object for all"
            assert first[:4] == struct.pack(">I", 7)
            image = Image.open(io.BytesIO(first[4:]))
            assert image.format == "JPEG" and image.size == (64, 40)
        assert hub.counters["encoded"] == 3 and hub.counters["published"] == 3


async def test_encoding_does_not_grow_with_the_audience() -> None:
    """The same frames to 1 and to 50 subscribers: as many encodes."""
    calls = []
    for audience in (1, 50):
        async with fake_hub() as (hub, sources, encoder):
            watchers = [Collector() for _ in range(audience)]
            for watcher in watchers:
                hub.subscribe(3, watcher)
            source = await sources.wait(3)
            for number in range(5):
                await source.frames.put(solid(32, 20, bytes([0, number * 50, 0, 0])))
                await watchers[-1].wait(number + 1)
            calls.append(encoder.calls)
            assert all(len(w.frames) == 5 for w in watchers)
    assert calls == [5, 5]


async def test_unchanged_updates_and_identical_thumbnails_are_not_sent() -> None:
    async with fake_hub() as (hub, sources, encoder):
        watcher = Collector()
        hub.subscribe(1, watcher)
        source = await sources.wait(1)
        red = solid(32, 20, b"\x00\x00\xff\x00")
        await source.frames.put(red)
        await watcher.wait(1)
        await source.frames.put(None)  # an update whose pixels were all the same
        await source.frames.put(solid(32, 20, b"\x00\x00\xff\x00"))  # same picture again
        await source.frames.put(solid(32, 20, b"\xff\x00\x00\x00"))
        await watcher.wait(2)
        assert encoder.calls == 2 + 1  # red, red again (found identical after encoding), blue
        assert hub.counters["unchanged"] == 1 and hub.counters["updates"] == 4
        assert len(watcher.frames) == 2


async def test_a_late_subscriber_gets_the_newest_thumbnail_at_once() -> None:
    async with fake_hub() as (hub, sources, _encoder):
        first, late = Collector(), Collector()
        hub.subscribe(2, first)
        source = await sources.wait(2)
        await source.frames.put(solid(16, 10, b"\x10\x20\x30\x00"))
        await first.wait(1)
        hub.subscribe(2, late)
        assert late.frames and late.frames[0][1] is first.frames[0][1]


async def test_the_connection_ends_after_the_grace_and_survives_a_quick_return() -> None:
    async with fake_hub(grace=0.3) as (hub, sources, _encoder):
        watcher = Collector()
        hub.subscribe(4, watcher)
        source = await sources.wait(4)
        hub.unsubscribe(4, watcher)
        await asyncio.sleep(0.1)
        hub.subscribe(4, watcher)  # a page reload: back within the grace
        await asyncio.sleep(0.4)
        assert not source.closed and len(sources.opened[4]) == 1
        hub.unsubscribe(4, watcher)
        await asyncio.sleep(0.5)
        assert source.closed, "the last watcher left: the VNC connection is closed"
        assert 4 not in hub.feeds


async def test_a_broken_connection_is_opened_again_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wall, "BACKOFF_FIRST", 0.05)
    async with fake_hub() as (hub, sources, _encoder):
        watcher = Collector()
        hub.subscribe(5, watcher)
        source = await sources.wait(5)
        await source.frames.put(ConnectionResetError("the VNC server went away"))
        again = await sources.wait(5, 2)
        assert source.closed
        await again.frames.put(solid(16, 10, b"\x01\x02\x03\x00"))
        await watcher.wait(1)
        assert hub.counters["errors"] == 1 and hub.counters["connects"] == 2


async def test_at_most_the_configured_rate() -> None:
    async with fake_hub(rate=5.0) as (_hub, sources, encoder):
        watcher = Collector()
        _hub.subscribe(6, watcher)
        source = await sources.wait(6)
        for number in range(20):
            source.frames.put_nowait(solid(16, 10, bytes([number, 0, 0, 0])))
        await asyncio.sleep(1.0)
        assert 2 <= encoder.calls <= 7, encoder.calls  # 1 s at 5/s: 5 or 6, fewer on a busy machine


# --- the RFB client, against a small fake VNC server -------------------------------------------


def raw_rect(x: int, y: int, w: int, h: int, bgrx: bytes) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, 0) + bgrx * (w * h)


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


@contextlib.asynccontextmanager
async def fake_vnc(width: int, height: int, answers: list[bytes]) -> AsyncIterator[tuple[ScreenTarget, list[bytes]]]:
    """A VNC server (security None) that answers each update request with the next answer."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(bytes([1, 1]))
            await reader.readexactly(1)
            writer.write(struct.pack(">I", 0))
            await reader.readexactly(1)  # ClientInit
            writer.write(struct.pack(">HH", width, height) + bytes(16) + struct.pack(">I", 4) + b"fake")
            await reader.readexactly(20)  # SetPixelFormat
            (count,) = struct.unpack(">xxH", await reader.readexactly(4))
            requests.append(await reader.readexactly(4 * count))  # the encodings
            for answer in answers:
                requests.append(await reader.readexactly(10))
                writer.write(answer)
                await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield ScreenTarget(Endpoint(host="127.0.0.1", port=port), "password"), requests
    finally:
        server.close()


RED, BLUE = b"\x00\x00\xff\x00", b"\xff\x00\x00\x00"


async def test_the_rfb_source_keeps_a_framebuffer_from_incremental_raw_updates() -> None:
    cut_text = struct.pack(">Bxxxi", 3, 5) + b"hello"
    answers = [
        update(raw_rect(0, 0, 8, 4, RED)),  # the whole screen
        update(raw_rect(2, 1, 3, 2, RED)),  # the same pixels: no change
        b"\x02" + cut_text + update(raw_rect(1, 1, 2, 1, BLUE)),  # a bell, a clipboard, a change
        update(struct.pack(">HHHHi", 0, 0, 4, 2, wall.ENCODING_DESKTOP_SIZE), raw_rect(0, 0, 4, 2, BLUE)),
    ]
    async with fake_vnc(8, 4, answers) as (target, requests):
        source = await wall.RfbSource.open(target)
        try:
            frame = await source.update()
            assert frame is not None and (frame.width, frame.height) == (8, 4)
            assert bytes(frame.pixels) == RED * 32
            assert await source.update() is None
            frame = await source.update()
            assert frame is not None
            expected = bytearray(RED * 32)
            expected[(8 + 1) * 4 : (8 + 3) * 4] = BLUE * 2
            assert bytes(frame.pixels) == bytes(expected)
            frame = await source.update()
            assert frame is not None and (frame.width, frame.height) == (4, 2)
            assert bytes(frame.pixels) == BLUE * 8
        finally:
            source.close()
    encodings = struct.unpack(">ii", requests[0])
    assert encodings == (0, wall.ENCODING_DESKTOP_SIZE)
    for request in requests[1:]:
        kind, incremental = request[0], request[1]
        assert (kind, incremental) == (3, 1), "incremental update requests only"


async def test_the_rfb_source_refuses_what_it_cannot_read() -> None:
    answers = [update(struct.pack(">HHHHi", 0, 0, 8, 4, 7) + b"\x00" * 16)]  # an encoding never asked for
    async with fake_vnc(8, 4, answers) as (target, _requests):
        source = await wall.RfbSource.open(target)
        try:
            with pytest.raises(Exception, match="unexpected rectangle"):
                await source.update()
        finally:
            source.close()


# --- the socket ------------------------------------------------------------------------------------


def communicator(token: str | None = None, origin: str | None = ORIGIN, path: str = "/ws/wall/") -> Any:
    headers = []
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def close_code(comm: WebsocketCommunicator) -> tuple[int, str]:
    async with asyncio.timeout(5):
        while True:
            message = await comm.receive_output(timeout=5)
            if message["type"] == "websocket.close":
                return int(message["code"]), str(message.get("reason", ""))


async def sandboxes_message(comm: WebsocketCommunicator, timeout: float = 5) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            message = await comm.receive_output(timeout=timeout)
            assert message["type"] == "websocket.send", message
            if message.get("text"):
                body = json.loads(message["text"])
                assert body["type"] == "sandboxes"
                return list(body["sandboxes"])


async def binary_frame(comm: WebsocketCommunicator, timeout: float = 5) -> bytes:
    message = await comm.receive_output(timeout=timeout)
    assert message["type"] == "websocket.send" and message.get("bytes") is not None, message
    return bytes(message["bytes"])


@pytest.fixture
def fast_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wall, "CAPTION_DEBOUNCE", 0.01)


@pytest.mark.django_db(transaction=True)
async def test_anonymous_is_refused_4401_and_a_foreign_origin_4403(cast: dict) -> None:
    comm = communicator()
    assert (await comm.connect())[0]
    assert (await close_code(comm))[0] == Close.UNAUTHENTICATED
    comm = communicator(cast["tokens"]["owner"], origin="http://evil.example")
    await comm.connect()
    assert (await close_code(comm))[0] == Close.FORBIDDEN


@pytest.mark.django_db(transaction=True)
async def test_each_user_sees_the_live_sandboxes_they_may_see(cast: dict, make_sandbox, fast_captions: None) -> None:
    mine = await database_sync_to_async(make_sandbox)(owner="owner", phase="starting", name="mine")
    await database_sync_to_async(make_sandbox)(owner="outsider", phase="pending", name="theirs")
    await database_sync_to_async(make_sandbox)(owner="owner", phase="stopped", name="gone")
    seen = {}
    for who in ("owner", "outsider", "viewer", "staff"):
        comm = communicator(cast["tokens"][who])
        assert (await comm.connect())[0]
        seen[who] = [s["name"] for s in await sandboxes_message(comm)]
        await comm.disconnect()
    assert seen == {
        "owner": ["mine"],
        "outsider": ["theirs"],
        "viewer": ["mine", "theirs"],
        "staff": ["mine", "theirs"],
    }

    comm = communicator(cast["tokens"]["owner"])
    await comm.connect()
    (first,) = await sandboxes_message(comm)
    assert set(first) == {"id", "name", "phase", "control", "goal", "activity"}
    assert first["id"] == mine.pk and first["goal"] is None
    assert first["control"]["label"] == "Nobody is driving"
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_captions_follow_phases_runs_and_goals(cast: dict, make_sandbox, fast_captions: None) -> None:
    box = await database_sync_to_async(make_sandbox)(owner="owner", phase="starting", name="busy")
    comm = communicator(cast["tokens"]["owner"])
    await comm.connect()
    (entry,) = await sandboxes_message(comm)
    assert entry["phase"] == "starting"

    async with fake_hub():  # ready: its thumbnails come from a fake VNC server
        await database_sync_to_async(services.record_phase)(box.pk, "ready")
        started = time.monotonic()
        (entry,) = await sandboxes_message(comm)
        assert entry["phase"] == "ready"
        assert time.monotonic() - started < 1.5, "a phase change is told at once, not at the next re-read"

        def start_a_run() -> AgentRun:
            run = AgentRun.objects.create(
                sandbox_id=box.pk, task="t", status="running", token_digest="x" * 64, model_settings={}
            )
            events.record(box.pk, "agent.started", "Started", data={"run": run.pk, "task": "t", "model": "scripted"})
            events.record(box.pk, "agent.step", "1", data={"run": run.pk, "step": 1, "goal": "Open the <b>form</b>"})
            return run

        run = await database_sync_to_async(start_a_run)()
        async with asyncio.timeout(10):
            while entry["goal"] is None:
                (entry,) = await sandboxes_message(comm, timeout=10)
        assert entry["goal"] == "Open the <b>form</b>"
        newest = await database_sync_to_async(lambda: box.events.order_by("-seq").first().at)()
        assert entry["activity"] == newest.isoformat()

        def end_the_run() -> None:
            AgentRun.objects.filter(pk=run.pk).update(status="done")
            events.record(box.pk, "agent.done", "Done", data={"run": run.pk, "result": "", "steps": 1, "seconds": 1})

        await database_sync_to_async(end_the_run)()
        async with asyncio.timeout(10):
            while entry["goal"] is not None:
                (entry,) = await sandboxes_message(comm, timeout=10)
        await database_sync_to_async(services.record_phase)(box.pk, "stopped")
        assert await sandboxes_message(comm) == []
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_thumbnails_flow_one_in_flight_per_tile_newest_first(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)(owner="owner", phase="ready", name="screen")
    async with fake_hub() as (hub, sources, _encoder):
        comm = communicator(cast["tokens"]["owner"])
        await comm.connect()
        await sandboxes_message(comm)
        source = await sources.wait(box.pk)
        colours = [bytes([n * 40, 0, 0, 0]) for n in range(5)]
        await source.frames.put(solid(48, 30, colours[0]))
        first = await binary_frame(comm)
        assert struct.unpack(">I", first[:4])[0] == box.pk
        # Unacknowledged: the next frames replace each other and nothing is sent.
        for colour in colours[1:]:
            await source.frames.put(solid(48, 30, colour))
        async with asyncio.timeout(5):
            while hub.counters["published"] < 5:
                await asyncio.sleep(0.02)
        assert await comm.receive_nothing(timeout=0.3)
        await comm.send_to(text_data=json.dumps({"type": "ack", "id": box.pk}))
        newest = await binary_frame(comm)
        assert newest == hub.feeds[box.pk].frame, "the newest, not the next in line"
        pixel = Image.open(io.BytesIO(newest[4:])).convert("RGB").getpixel((10, 10))
        assert abs(pixel[2] - colours[-1][0]) < 8  # BGRX: the first byte is blue
        assert hub.counters["sent"] == 2 and hub.counters["skipped"] == 3
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "frame",
    [
        {"text_data": "hello"},
        {"text_data": json.dumps({"type": "ack"})},
        {"text_data": json.dumps({"type": "ack", "id": "1"})},
        {"text_data": json.dumps({"type": "ack", "id": True})},
        {"text_data": json.dumps({"type": "ack", "id": 1, "more": 1})},
        {"text_data": json.dumps({"type": "ack", "id": 999})},  # nothing in flight
        {"text_data": json.dumps({"type": "ack", "id": 1, "pad": "x" * 300})},
        {"bytes_data": b"\x00\x00\x00\x01"},
    ],
)
async def test_bad_input_closes_4400(cast: dict, frame: dict[str, Any]) -> None:
    comm = communicator(cast["tokens"]["owner"])
    await comm.connect()
    await sandboxes_message(comm)
    await comm.send_to(**frame)
    code, reason = await close_code(comm)
    assert code == Close.BAD_MESSAGE, reason


@pytest.mark.django_db(transaction=True)
async def test_a_wall_share_grant_sees_every_live_sandbox_and_a_sandbox_grant_is_refused(
    cast: dict, make_sandbox, fast_captions: None
) -> None:
    """The scope the share-links middleware makes for an anonymous browser."""
    await database_sync_to_async(make_sandbox)(owner="owner", phase="starting", name="a")
    await database_sync_to_async(make_sandbox)(owner="outsider", phase="starting", name="b")

    def shared(grant: Any, origin: str = ORIGIN) -> WebsocketCommunicator:
        comm = WebsocketCommunicator(WallConsumer.as_asgi(), "/ws/wall/", headers=[(b"origin", origin.encode())])
        comm.scope.update(user=AnonymousUser(), auth_method="share", share=grant)
        return comm

    comm = shared(SimpleNamespace(link_id=1, sandbox_id=None, wall=True))
    assert (await comm.connect())[0]
    assert [s["name"] for s in await sandboxes_message(comm)] == ["a", "b"]
    await comm.disconnect()
    for comm in (
        shared(SimpleNamespace(link_id=2, sandbox_id=1, wall=False)),
        shared(SimpleNamespace(link_id=1, sandbox_id=None, wall=True), origin="http://evil.example"),
    ):
        await comm.connect()
        assert (await close_code(comm))[0] == Close.FORBIDDEN


# --- the page ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_needs_a_login_and_has_a_kiosk_mode(client: Client, cast: dict) -> None:
    response = client.get("/wall/?kiosk=1")
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert "kiosk%3D1" in response["Location"] or "kiosk=1" in response["Location"]
    client.login(username="viewer", password=cast["password"])
    page = client.get("/wall/").content.decode()
    assert 'data-kiosk="false"' in page and "namek/wall.js" in page and 'href="/wall/"' in page
    kiosk = client.get("/wall/?kiosk=1&rotate=7").content.decode()
    assert 'data-kiosk="true"' in kiosk and 'data-rotate="7.0"' in kiosk and 'class="wall-page kiosk"' in kiosk
    for value, shown in (("1", "3.0"), ("nan", "15.0"), ("1e9", "3600.0"), ("x", "15.0")):
        assert f'data-rotate="{shown}"' in client.get(f"/wall/?kiosk=1&rotate={value}").content.decode()


@pytest.mark.django_db
def test_an_unknown_share_token_is_refused(client: Client, cast: dict) -> None:
    response = client.get("/wall/?share=not-a-token")
    assert response.status_code == 403
    assert "wall.js" not in response.content.decode()


@pytest.mark.django_db
def test_a_wall_share_link_opens_the_page_and_a_sandbox_link_does_not(client: Client, cast: dict, make_sandbox) -> None:
    sharing = pytest.importorskip("sandboxes.sharing", reason="share links (sandboxes/sharing.py) are not here yet")
    from django.contrib.auth import get_user_model

    staff = get_user_model().objects.get(username="staff")
    link, token = sharing.issue(staff, wall=True)
    response = client.get(f"/wall/?kiosk=1&share={token}")
    assert response.status_code == 200
    page = response.content.decode()
    assert "namek/wall.js" in page and 'id="share-token"' in page and 'data-kiosk="true"' in page
    assert response["Referrer-Policy"] == "no-referrer" and "no-store" in response["Cache-Control"]
    link.refresh_from_db()
    assert link.uses == 1
    _one, box_token = sharing.issue(staff, sandbox=make_sandbox())
    assert client.get(f"/wall/?share={box_token}").status_code == 403
    sharing.revoke(link, "staff")
    assert client.get(f"/wall/?share={token}").status_code == 403


@pytest.mark.django_db
def test_the_counters_are_for_staff(client: Client, cast: dict) -> None:
    assert client.get("/wall/stats").status_code == 401
    owner = client.get("/wall/stats", HTTP_AUTHORIZATION=f"Bearer {cast['tokens']['owner']}")
    assert owner.status_code == 403
    staff = client.get("/wall/stats", HTTP_AUTHORIZATION=f"Bearer {cast['tokens']['staff']}")
    assert staff.status_code == 200
    assert {"encoded", "published", "sent", "encode_seconds", "feeds", "cpu_seconds"} <= set(staff.json())


# --- the kiosk in a real browser, three agents at work -------------------------------------------

STEPS = """
name: wall
task: Walk the demo shop
steps:
{steps}
  - done: {{text: "walked", success: true}}
"""
PAGES = ["/demo/", "/demo/quote", "/demo/search?q=lamp", "/demo/login"]


def step_file(label: str, rounds: int = 4) -> str:
    lines = []
    for number in range(rounds):
        for page in PAGES:
            lines.append(f"  - navigate: {page}\n    goal: {label} visits {page} (round {number + 1})")
            lines.append("  - wait: {seconds: 1}")
    return STEPS.format(steps="\n".join(lines))


WHO = ("owner", "operator", "staff")


@pytest.fixture
def three_busy_sandboxes(live_namek: LiveNamek) -> Iterator[list[dict[str, Any]]]:
    """Three sandboxes (of three users: a user may have three), each with an agent walking
    the demo shop; stopped, with their runs, however the test ends."""
    with contextlib.ExitStack() as stack:
        boxes = [stack.enter_context(ready_sandbox(live_namek, who, name=f"wall-{who}")) for who in WHO]
        for box, who in zip(boxes, WHO, strict=True):
            body = {"script": step_file(who), "task": "walk"}
            status, run = live_namek.api("POST", f"/api/sandboxes/{box['id']}/runs", who, body)
            assert status == 201, run
        yield boxes


@pytest.mark.processes
@pytest.mark.browser
async def test_the_kiosk_shows_three_agents_live(
    live_namek: LiveNamek, three_busy_sandboxes: list[dict[str, Any]], browser: Browser, tmp_path: Path
) -> None:
    ids = [box["id"] for box in three_busy_sandboxes]
    page = await browser.new_page(viewport={"width": 1600, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, live_namek.base_url, "staff")
    await page.goto(live_namek.base_url + "/wall/?kiosk=1&rotate=4")
    for sandbox_id in ids:
        await page.locator(f'.tile[data-sandbox-id="{sandbox_id}"]').wait_for(timeout=20000)
    assert not await page.locator(".topbar").is_visible(), "no navigation in the kiosk"

    # Every tile's picture changes over time, and shows an agent's goal.
    async def frames() -> dict[int, int]:
        counts = await page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.tile')]"
            ".map(t => [t.dataset.sandboxId, +t.dataset.frames]))"
        )
        return {int(k): int(v) for k, v in counts.items()}

    deadline = time.monotonic() + 60
    start = await frames()
    while time.monotonic() < deadline:
        now = await frames()
        if all(now.get(i, 0) >= start.get(i, 0) + 3 for i in ids):
            break
        await asyncio.sleep(0.5)
    assert all(now.get(i, 0) >= start.get(i, 0) + 3 for i in ids), (start, now)
    for sandbox_id in ids:
        goal = page.locator(f'.tile[data-sandbox-id="{sandbox_id}"] .tile-goal')
        await page.wait_for_function(
            "(el) => / visits \\/demo\\//.test(el.textContent)", arg=await goal.element_handle(), timeout=30000
        )
        control = await page.locator(f'.tile[data-sandbox-id="{sandbox_id}"] .tile-control').text_content()
        assert control in ("Agent driving", "Paused"), control

    # The kiosk features one sandbox in a large live view and moves on by itself.
    featured = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(featured) < 2:
        name = await page.locator("#feature-name").text_content()
        if name:
            featured.add(name)
        await asyncio.sleep(0.5)
    assert len(featured) >= 2, featured
    await page.locator("#feature-live:not(.pending) canvas").wait_for(timeout=15000)
    await page.screenshot(path=str(tmp_path / "kiosk.png"))

    # Without the kiosk: click a tile, its live screen opens full size; Escape closes it.
    await page.goto(live_namek.base_url + "/wall/")
    tile = page.locator(f'.tile[data-sandbox-id="{ids[0]}"]')
    await tile.wait_for()
    await page.wait_for_function(f"+document.querySelector('.tile[data-sandbox-id=\"{ids[0]}\"]').dataset.frames > 0")
    await page.screenshot(path=str(tmp_path / "wall.png"))
    await tile.click()
    await page.locator("#wall-viewer canvas").wait_for(timeout=15000)
    await page.wait_for_function("document.getElementById('viewer-status').textContent === 'Live'")
    assert await page.locator("#viewer-name").text_content() == "wall-owner"
    await page.keyboard.press("Escape")
    assert await page.locator("#wall-viewer").is_hidden()
    assert errors == []

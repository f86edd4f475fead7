"""The wall's shared work, once per web process whatever the audience: thumbnails and captions.

**Thumbnails** (``ThumbnailHub``, ``thumbnails()``). For each sandbox that at least one
wall watcher of this process wants, the hub keeps ONE RFB client of the sandbox's VNC
server (``RfbSource``: Namek's own handshake from ``sandboxes.rfb``, 32-bit BGRX pixels in
the Raw encoding, the one encoding every server has, and the DesktopSize pseudo-encoding).
It keeps that connection's framebuffer and asks for *incremental* updates only (x11vnc
answers a non-incremental request with a stale frame after sitting idle), at most
``NAMEK_WALL_FPS`` per second: the next request goes out no sooner than 1/fps after the
previous one, and the server answers an incremental request only once something changed,
so a still screen costs nothing. An update that changed no pixel is skipped; a changed one
is scaled down to fit ``THUMBNAIL_BOX`` and encoded as a JPEG in a small thread pool (the
event loop stays free), skipped again if the JPEG is the one already sent, and otherwise
turned ONCE into the wire frame (4-byte big-endian sandbox id + JPEG) whose same bytes
object every subscriber of the process gets (``Subscriber.thumbnail``). Memory per sandbox:
one framebuffer, one read chunk, one JPEG.

The connection ends ``GRACE_SECONDS`` after the last watcher of the sandbox left (a page
reload keeps it), when the sandbox is no longer ready (its watchers unsubscribe: the
captions say so), or on an error, after which it is tried again with a growing delay
(``BACKOFF_FIRST`` doubling to ``BACKOFF_MAX``) while someone still watches.

**Captions** (``CaptionFeed``, ``captions()``). Every live sandbox with its phase, who
drives it (``sandboxes.control.summary``), the goal of the newest ``agent.step`` of its
active run and the time of its newest event. The feed re-reads them every
``CAPTION_REFRESH_SECONDS`` and at once (``CAPTION_DEBOUNCE`` later) when the dashboard
group ``services.DASHBOARD_GROUP`` announces a change (a phase, a take-over, a run
pausing): one channel-layer membership and one set of queries per process, the event
rows read only for sandboxes whose newest ``seq`` moved. Each watcher only filters the
list (``viewer.consumers.wall``).

``stats()`` sums the counters of every hub of the process (the ``/wall/stats`` page of
staff, and the benchmark ``tests/benchmarks/wall_bench.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist

from sandboxes import control, rfb, services
from sandboxes.backends import get_backend
from sandboxes.backends.base import ScreenTarget
from sandboxes.models import ACTIVE_RUN_STATUSES, LIVE_PHASES, AgentRun, ControlLease, Event, Phase, Sandbox
from viewer import phase_feed

log = logging.getLogger(__name__)

#: thumbnails per second and sandbox at most (``settings.NAMEK_WALL_FPS`` when set)
DEFAULT_FPS = 2.0
#: a thumbnail fits in this box (the screen's aspect ratio kept)
THUMBNAIL_BOX = (480, 300)
JPEG_QUALITY = 70
#: how long a sandbox's VNC connection outlives its last watcher
GRACE_SECONDS = 5.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0
#: most bytes of pixels read from the VNC server at a time (and the stream's buffer limit)
READ_CHUNK = 256 * 1024
#: a screen bigger than NAMEK_SCREEN_SIZE's maximum is refused
MAX_PIXELS = 3840 * 2160
#: most bytes of clipboard text skipped at a time
SKIP_CHUNK = 64 * 1024
ENCODING_RAW = 0
ENCODING_DESKTOP_SIZE = -223
ENCODER_THREADS = 2
#: the wire frame's header: the sandbox id
HEADER = struct.Struct(">I")

CAPTION_REFRESH_SECONDS = 2.0
CAPTION_DEBOUNCE = 0.1
#: longest goal shown (agents may write pages)
MAX_GOAL = 300


def fps() -> float:
    value = float(getattr(settings, "NAMEK_WALL_FPS", DEFAULT_FPS))
    return value if value > 0 else DEFAULT_FPS


# --- frames ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A whole screen: ``pixels`` is BGRX, 4 bytes a pixel, row after row."""

    width: int
    height: int
    pixels: bytes | bytearray


class FrameSource(Protocol):
    async def update(self) -> Frame | None:
        """Wait for the screen's next change: the whole frame, or None when no pixel changed.
        The frame must stay unchanged until the next call."""

    def close(self) -> None: ...


SourceFactory = Callable[[int], Awaitable[FrameSource]]
Encoder = Callable[[Frame], bytes]


class SandboxNotReady(Exception):
    """The sandbox has no screen to read (not ready, stopped, gone)."""


def encode_thumbnail(frame: Frame, box: tuple[int, int] = THUMBNAIL_BOX, quality: int = JPEG_QUALITY) -> bytes:
    """The frame scaled down to fit ``box``, as a JPEG (runs in a thread)."""
    from PIL import Image

    image = Image.frombuffer("RGB", (frame.width, frame.height), frame.pixels, "raw", "BGRX", 0, 1)
    scale = min(box[0] / frame.width, box[1] / frame.height, 1.0)
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class RfbSource:
    """A shared RFB client that keeps the framebuffer of one VNC server (Raw encoding)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, width: int, height: int) -> None:
        self.reader = reader
        self.writer = writer
        self.width = 0
        self.height = 0
        self.framebuffer = bytearray()
        self._resize(width, height)

    @classmethod
    async def open(cls, target: ScreenTarget) -> RfbSource:
        endpoint = target.endpoint
        if endpoint.unix_path:
            reader, writer = await asyncio.open_unix_connection(endpoint.unix_path, limit=READ_CHUNK)
        else:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=READ_CHUNK)
        try:
            await rfb.authenticate(reader, writer, target.password)
            writer.write(b"\x01")  # ClientInit, shared: nobody else is disconnected
            init = await rfb.read_server_init(reader)
            source = cls(reader, writer, init.width, init.height)
            # SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 255 each, shifts 16/8/0
            pixel_format = (rfb.MSG_SET_PIXEL_FORMAT, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            writer.write(struct.pack(">BxxxBBBBHHHBBBxxx", *pixel_format))
            writer.write(struct.pack(">BxHii", rfb.MSG_SET_ENCODINGS, 2, ENCODING_RAW, ENCODING_DESKTOP_SIZE))
            await writer.drain()
        except BaseException:
            writer.close()
            raise
        return source

    def _resize(self, width: int, height: int) -> None:
        if not (0 < width and 0 < height and width * height <= MAX_PIXELS):
            raise rfb.RFBError(f"unexpected screen size {width}x{height}")
        self.width, self.height = width, height
        self.framebuffer = bytearray(width * height * 4)

    async def update(self) -> Frame | None:
        request = (rfb.MSG_FB_UPDATE_REQUEST, 1, 0, 0, self.width, self.height)  # incremental
        self.writer.write(struct.pack(">BBHHHH", *request))
        await self.writer.drain()
        while True:
            (kind,) = await self.reader.readexactly(1)
            if kind == 0:  # FramebufferUpdate
                changed = await self._read_update()
                return Frame(self.width, self.height, self.framebuffer) if changed else None
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText: skipped, in chunks
                (length,) = struct.unpack(">xxxi", await self.reader.readexactly(7))
                left = abs(length)  # negative: the extended clipboard format
                while left:
                    left -= len(await self.reader.readexactly(min(left, SKIP_CHUNK)))
                continue
            raise rfb.RFBError(f"unexpected server message {kind}")

    async def _read_update(self) -> bool:
        (count,) = struct.unpack(">xH", await self.reader.readexactly(3))
        changed = False
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self.reader.readexactly(12))
            if encoding == ENCODING_DESKTOP_SIZE:
                self._resize(w, h)
                changed = True
                continue
            if encoding != ENCODING_RAW or x + w > self.width or y + h > self.height:
                raise rfb.RFBError(f"unexpected rectangle (encoding {encoding}) in a Raw update")
            changed = await self._read_rectangle(x, y, w, h) or changed
        return changed

    async def _read_rectangle(self, x: int, y: int, w: int, h: int) -> bool:
        """Copy a Raw rectangle into the framebuffer; whether any pixel changed."""
        row = w * 4
        if not row or not h:
            return False
        rows_per_read = max(1, READ_CHUNK // row)
        framebuffer, stride = self.framebuffer, self.width * 4
        changed = False
        done = 0
        while done < h:
            count = min(rows_per_read, h - done)
            data = memoryview(await self.reader.readexactly(count * row))
            for index in range(count):
                start = (y + done + index) * stride + x * 4
                pixels = data[index * row : (index + 1) * row]
                if changed:
                    framebuffer[start : start + row] = pixels
                elif framebuffer[start : start + row] != pixels:
                    framebuffer[start : start + row] = pixels
                    changed = True
            done += count
        return changed

    def close(self) -> None:
        self.writer.close()


def _ready_backend(sandbox_id: int) -> str:
    sandbox = Sandbox.objects.filter(pk=sandbox_id).only("phase", "backend").first()
    if sandbox is None or sandbox.phase != Phase.READY:
        raise SandboxNotReady(f"sandbox {sandbox_id} is {sandbox.phase if sandbox else 'gone'}")
    return sandbox.backend


async def open_rfb_source(sandbox_id: int) -> FrameSource:
    """The default source: the sandbox's VNC server, if it is ready (else SandboxNotReady)."""
    backend = await database_sync_to_async(_ready_backend)(sandbox_id)
    target = await sync_to_async(get_backend(backend).screen_target, thread_sensitive=False)(sandbox_id)
    return await asyncio.wait_for(RfbSource.open(target), CONNECT_TIMEOUT)


# --- the thumbnail hub --------------------------------------------------------------------------

#: what each hub counts, since it began
COUNTERS = (
    "connects",  # VNC connections opened
    "errors",  # connections that could not open, or broke
    "updates",  # FramebufferUpdates read
    "encoded",  # thumbnails encoded
    "encode_seconds",  # CPU seconds of the encoding threads
    "unchanged",  # encoded, but the same JPEG as the one before: not sent
    "published",  # thumbnails handed to the subscribers (once for all of them)
    "sent",  # thumbnails sent to browsers (counted by the consumers)
    "skipped",  # thumbnails a watcher never got: a newer one replaced it before it could
)


class Subscriber(Protocol):
    def thumbnail(self, sandbox_id: int, frame: bytes) -> None:
        """A new thumbnail (the wire frame: id + JPEG). Must not block: keep the newest."""


@dataclass(eq=False)
class Feed:
    sandbox_id: int
    subscribers: set[Subscriber] = field(default_factory=set)
    #: the newest thumbnail as sent: HEADER + JPEG, one object for every subscriber
    frame: bytes | None = None
    task: asyncio.Task[None] | None = None
    stop_timer: asyncio.TimerHandle | None = None
    #: updates read from the VNC server, all connections together
    updates: int = 0


_encoder_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _encoder_pool  # noqa: PLW0603 - one small pool per process
    if _encoder_pool is None:
        _encoder_pool = ThreadPoolExecutor(max_workers=ENCODER_THREADS, thread_name_prefix="namek-wall-encode")
    return _encoder_pool


def _timed(encoder: Encoder, frame: Frame) -> tuple[bytes, float]:
    """Encode in a worker thread: the JPEG and the thread's CPU seconds it took."""
    started = time.thread_time()
    data = encoder(frame)
    return data, time.thread_time() - started


class ThumbnailHub:
    def __init__(
        self,
        source_factory: SourceFactory = open_rfb_source,
        encoder: Encoder = encode_thumbnail,
        *,
        rate: float | None = None,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.source_factory = source_factory
        self.encoder = encoder
        self.rate = rate
        self.grace = grace
        self.feeds: dict[int, Feed] = {}
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    # --- subscribers ---

    def subscribe(self, sandbox_id: int, subscriber: Subscriber) -> None:
        feed = self.feeds.get(sandbox_id)
        if feed is None:
            feed = self.feeds[sandbox_id] = Feed(sandbox_id)
        if feed.stop_timer is not None:
            feed.stop_timer.cancel()
            feed.stop_timer = None
        feed.subscribers.add(subscriber)
        if feed.task is None or feed.task.done():
            feed.task = asyncio.ensure_future(self._run(feed))
        if feed.frame is not None:
            subscriber.thumbnail(sandbox_id, feed.frame)

    def unsubscribe(self, sandbox_id: int, subscriber: Subscriber) -> None:
        feed = self.feeds.get(sandbox_id)
        if feed is None:
            return
        feed.subscribers.discard(subscriber)
        if not feed.subscribers and feed.stop_timer is None:
            loop = asyncio.get_running_loop()
            feed.stop_timer = loop.call_later(self.grace, self._stop_unwatched, feed)

    def _stop_unwatched(self, feed: Feed) -> None:
        feed.stop_timer = None
        if feed.subscribers or self.feeds.get(feed.sandbox_id) is not feed:
            return
        del self.feeds[feed.sandbox_id]
        if feed.task is not None:
            feed.task.cancel()

    async def close(self) -> None:
        """Stop every feed now (tests; a process ending)."""
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            if feed.stop_timer is not None:
                feed.stop_timer.cancel()
            if feed.task is not None:
                feed.task.cancel()
        for feed in feeds:
            if feed.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feed.task

    # --- the work, once per sandbox ---

    async def _run(self, feed: Feed) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                source = await self.source_factory(feed.sandbox_id)
            except asyncio.CancelledError:
                raise
            except SandboxNotReady as exc:
                log.debug("wall: %s", exc)
            except Exception as exc:
                self.counters["errors"] += 1
                log.info("wall: sandbox %s: cannot read its screen: %r", feed.sandbox_id, exc)
            else:
                self.counters["connects"] += 1
                updates = feed.updates
                try:
                    await self._pump(feed, source)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.counters["errors"] += 1
                    log.info("wall: sandbox %s: its screen connection ended: %r", feed.sandbox_id, exc)
                    if feed.updates > updates:  # it worked for a while: try again soon
                        backoff = BACKOFF_FIRST
                finally:
                    source.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _pump(self, feed: Feed, source: FrameSource) -> None:
        """Read, encode and hand out until the source fails (raises)."""
        loop = asyncio.get_running_loop()
        next_request = loop.time()
        while True:
            delay = next_request - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_request = loop.time() + 1.0 / (self.rate or fps())
            frame = await source.update()
            feed.updates += 1
            self.counters["updates"] += 1
            if frame is None:
                continue
            jpeg, seconds = await loop.run_in_executor(_pool(), _timed, self.encoder, frame)
            self.counters["encoded"] += 1
            self.counters["encode_seconds"] += seconds
            wire = HEADER.pack(feed.sandbox_id) + jpeg
            if wire == feed.frame:
                self.counters["unchanged"] += 1
                continue
            feed.frame = wire
            self.counters["published"] += 1
            for subscriber in list(feed.subscribers):
                subscriber.thumbnail(feed.sandbox_id, wire)


# --- captions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Captions:
    """Every live sandbox, oldest first: each the public fields and ``owner_id``."""

    entries: tuple[dict[str, Any], ...]
    #: the whole list as the socket sends it, for watchers who see every sandbox
    text: str

    def visible(self, may_see: Callable[[int], bool]) -> str:
        """The message for a watcher who sees only the sandboxes ``may_see(owner_id)``."""
        return message([e for e in self.entries if may_see(e["owner_id"])])


def public(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "owner_id"}


def message(entries: list[dict[str, Any]]) -> str:
    return json.dumps({"type": "sandboxes", "sandboxes": [public(e) for e in entries]})


@dataclass
class _Seen:
    seq: int
    run: int | None
    activity: str
    goal: str | None


def _lease(sandbox: Sandbox) -> ControlLease | None:
    try:
        return sandbox.lease
    except ObjectDoesNotExist:  # a sandbox made before leases, or in a test
        return None


def read_captions(cache: dict[int, _Seen]) -> list[dict[str, Any]]:
    """The live sandboxes with their captions; ``cache`` keeps what was read per sandbox,
    so event rows are read only for sandboxes whose newest event or active run changed."""
    sandboxes = list(
        Sandbox.objects.filter(phase__in=LIVE_PHASES).select_related("lease__user", "lease__run").order_by("pk")
    )
    ids = [s.pk for s in sandboxes]
    active = dict(
        AgentRun.objects.filter(sandbox_id__in=ids, status__in=ACTIVE_RUN_STATUSES).values_list("sandbox_id", "pk")
    )
    entries = []
    for sandbox in sandboxes:
        run = active.get(sandbox.pk)
        seen = cache.get(sandbox.pk)
        if seen is None or seen.seq != sandbox.event_seq or seen.run != run:
            newest = Event.objects.filter(sandbox_id=sandbox.pk, seq=sandbox.event_seq).values_list("at", flat=True)
            at = newest.first() or sandbox.created_at
            goal = None
            if run is not None:
                step = (
                    Event.objects.filter(sandbox_id=sandbox.pk, kind="agent.step", data__run=run)
                    .order_by("-seq")
                    .values_list("data", flat=True)
                    .first()
                )
                text = step.get("goal") if isinstance(step, dict) else None
                goal = text[:MAX_GOAL] if isinstance(text, str) and text.strip() else None
            seen = cache[sandbox.pk] = _Seen(sandbox.event_seq, run, at.isoformat(), goal)
        entries.append(
            {
                "id": sandbox.pk,
                "name": sandbox.name,
                "phase": sandbox.phase,
                "control": control.summary(_lease(sandbox)),
                "goal": seen.goal,
                "activity": seen.activity,
                "owner_id": sandbox.owner_id,
            }
        )
    for gone in set(cache) - set(ids):
        del cache[gone]
    return entries


class CaptionSubscriber(Protocol):
    def captions(self, captions: Captions) -> None:
        """The live sandboxes changed (or this is the first list). Must not block."""


class CaptionFeed:
    def __init__(
        self,
        reader: Callable[[dict[int, _Seen]], list[dict[str, Any]]] = read_captions,
        refresh: float = CAPTION_REFRESH_SECONDS,
    ) -> None:
        self.reader = reader
        self.refresh = refresh
        self.subscribers: set[CaptionSubscriber] = set()
        self.current: Captions | None = None
        self.poke = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.reads = 0

    def join(self, subscriber: CaptionSubscriber) -> None:
        """Add a subscriber: it gets the current list now (if there is one yet), then
        every change."""
        self.subscribers.add(subscriber)
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        elif self.current is not None:
            subscriber.captions(self.current)

    async def leave(self, subscriber: CaptionSubscriber) -> None:
        self.subscribers.discard(subscriber)
        if self.subscribers or self.task is None:
            return
        task, self.task = self.task, None
        self.current = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _run(self) -> None:
        phase_feed.ensure_running()
        layer = get_channel_layer()
        channel = ""
        receiver: asyncio.Task[None] | None = None
        cache: dict[int, _Seen] = {}
        try:
            if layer is not None:
                # One membership of the dashboard group for every watcher of the process.
                channel = await layer.new_channel()
                await layer.group_add(services.DASHBOARD_GROUP, channel)
                receiver = asyncio.ensure_future(self._receive(layer, channel))
            while True:
                self.poke.clear()
                await self._read(cache)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.poke.wait(), self.refresh)
                    await asyncio.sleep(CAPTION_DEBOUNCE)  # a burst of changes: one read
        finally:
            if receiver is not None:
                receiver.cancel()
            if channel and layer is not None:
                with contextlib.suppress(Exception):  # the layer may be gone: the group expires
                    await layer.group_discard(services.DASHBOARD_GROUP, channel)

    async def _read(self, cache: dict[int, _Seen]) -> None:
        try:
            entries = await database_sync_to_async(self.reader)(cache)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("wall: reading the live sandboxes failed; retrying")
            return
        self.reads += 1
        if self.current is None or entries != list(self.current.entries):
            self.current = Captions(tuple(entries), message(entries))
            for subscriber in list(self.subscribers):
                subscriber.captions(self.current)

    async def _receive(self, layer: Any, channel: str) -> None:
        while True:
            try:
                received = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. Redis restarting: the periodic re-read goes on
                log.exception("wall: the dashboard group could not be read; retrying")
                await asyncio.sleep(1)
                continue
            if received.get("type") == "sandbox.changed":
                self.poke.set()


# --- one of each per event loop -----------------------------------------------------------------

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThumbnailHub] = weakref.WeakKeyDictionary()
_feeds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CaptionFeed] = weakref.WeakKeyDictionary()


def thumbnails() -> ThumbnailHub:
    """This event loop's thumbnail hub (Daphne has one loop; tests make one per test)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = ThumbnailHub()
    return _hubs[loop]


def captions() -> CaptionFeed:
    """This event loop's caption feed."""
    loop = asyncio.get_running_loop()
    if loop not in _feeds:
        _feeds[loop] = CaptionFeed()
    return _feeds[loop]


def stats() -> dict[str, Any]:
    """The counters of this process's hubs, summed (read from any thread)."""
    total: dict[str, Any] = {"feeds": 0, "watchers": 0, "caption_reads": 0, **dict.fromkeys(COUNTERS, 0)}
    for hub in list(_hubs.values()):
        for name, value in hub.counters.items():
            total[name] += value
        feeds = list(hub.feeds.values())
        total["feeds"] += sum(1 for feed in feeds if feed.task is not None and not feed.task.done())
    for feed in list(_feeds.values()):
        total["watchers"] += len(feed.subscribers)
        total["caption_reads"] += feed.reads
    total["cpu_seconds"] = time.process_time()
    total["fps"] = fps()
    total["thumbnail_box"] = list(THUMBNAIL_BOX)
    return total

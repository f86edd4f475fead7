"""A minimal asyncio RFB (VNC) client for benchmarks, over three transports.

The client only *skips* pixel data (it never decodes it): it parses every message the
server sends far enough to know where it ends, so that it can time and count whole
framebuffer updates. Transports:

* ``NamekRelayTransport``: Namek's screen relay (websocket, subprotocol ``binary``), which
  offers security type None and needs ``{"type": "ack", "bytes": N}`` text frames;
* ``WebsocketTransport``: a plain websocket-to-VNC bridge such as websockify (VncAuth);
* ``UnixTransport``: the VNC server's UNIX socket itself (VncAuth).

Only what a benchmark needs is implemented: RFB 3.8, 32 bpp true colour, the Raw (0) and
Tight (7) encodings, and the server messages a server may send unasked
(SetColourMapEntries, Bell, ServerCutText).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxes.rfb import PROTOCOL_VERSION, SECURITY_NONE, SECURITY_VNC_AUTH, vnc_auth_response

ENCODING_RAW = 0
ENCODING_TIGHT = 7
ENCODINGS = {"raw": ENCODING_RAW, "tight": ENCODING_TIGHT}
#: pseudo-encodings a server might send although nobody asked (no payload except -308)
PSEUDO_DESKTOP_SIZE = -223
PSEUDO_LAST_RECT = -224
PSEUDO_EXTENDED_DESKTOP_SIZE = -308

#: 32 bpp, depth 24, little-endian, true colour, 8 bits per channel (red at bit 16)
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4
#: Tight's TPIXEL for 32 bpp true colour with depth 24 and 8-bit channels
TPIXEL = 3
TIGHT_MIN_TO_COMPRESS = 12


class RFBProtocolError(Exception):
    """The server sent something this client cannot parse."""


# --- transports ---------------------------------------------------------------------------


class Transport:
    """A byte stream with exact reads and cheap skips, built on chunks from ``_next_chunk``."""

    def __init__(self) -> None:
        self._chunk: bytes = b""
        self._pos = 0
        #: bytes received from the peer so far (whole chunks, handshake included)
        self.received = 0
        #: bytes consumed by the parser so far
        self.consumed = 0

    async def _next_chunk(self) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def chunk_done(self) -> None:
        """Called after the parser finished reading a unit (e.g. a whole update)."""

    async def _fill(self) -> None:
        chunk = await self._next_chunk()
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        self.received += len(chunk)
        self._chunk, self._pos = chunk, 0

    async def wait_data(self) -> float:
        """Wait until at least one byte can be read; return when it became available."""
        if self._pos >= len(self._chunk):
            await self._fill()
        return time.perf_counter()

    async def read(self, count: int) -> bytes:
        self.consumed += count
        available = len(self._chunk) - self._pos
        if available >= count:
            start = self._pos
            self._pos += count
            return self._chunk[start : self._pos]
        parts = [self._chunk[self._pos :]]
        missing = count - available
        while missing:
            await self._fill()
            take = min(missing, len(self._chunk))
            parts.append(self._chunk[:take])
            self._pos = take
            missing -= take
        return b"".join(parts)

    async def skip(self, count: int) -> None:
        self.consumed += count
        while True:
            available = len(self._chunk) - self._pos
            if available >= count:
                self._pos += count
                return
            count -= available
            self._pos = len(self._chunk)
            await self._fill()


class UnixTransport(Transport):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> UnixTransport:
        reader, writer = await asyncio.open_unix_connection(path, limit=4 * 1024 * 1024)
        return cls(reader, writer)

    async def _next_chunk(self) -> bytes:
        return await self.reader.read(4 * 1024 * 1024)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class WebsocketTransport(Transport):
    """Binary websocket frames carry the RFB stream (websockify's protocol)."""

    def __init__(self, websocket: Any) -> None:
        super().__init__()
        self.ws = websocket

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str] | None = None) -> WebsocketTransport:
        from websockets.asyncio.client import connect

        websocket = await connect(
            url,
            subprotocols=["binary"],  # type: ignore[list-item]
            max_size=None,
            compression=None,
            additional_headers=headers or {},
            ping_interval=None,
            open_timeout=10,
        )
        return cls(websocket)

    async def _next_chunk(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed as exc:
                raise ConnectionError(f"websocket closed: {exc}") from None
            if isinstance(message, bytes):
                return message
            # text frames carry nothing of the RFB stream: ignore them

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


class NamekRelayTransport(WebsocketTransport):
    """Namek's relay: like websockify, plus acknowledgements of what was received."""

    ACK_EVERY = 1024 * 1024  # as the page does (static/namek/screen.js)

    def __init__(self, websocket: Any) -> None:
        super().__init__(websocket)
        self.acked = 0

    async def _ack(self) -> None:
        self.acked = self.received
        await self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))

    async def _fill(self) -> None:
        await super()._fill()
        if self.received - self.acked >= self.ACK_EVERY:
            await self._ack()

    async def chunk_done(self) -> None:
        if self.received != self.acked:
            await self._ack()


# --- the client ---------------------------------------------------------------------------


@dataclass
class UpdateStats:
    updates: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rects: int = 0


class RFBClient:
    def __init__(self, transport: Transport, password: str | None = None) -> None:
        self.t = transport
        self.password = password
        self.width = 0
        self.height = 0
        self.name = ""
        self.security_type = 0

    # handshake -----------------------------------------------------------------------------

    async def handshake(self) -> None:
        version = await self.t.read(12)
        if not version.startswith(b"RFB 003."):
            raise RFBProtocolError(f"not an RFB server: {version!r}")
        await self.t.send(PROTOCOL_VERSION)
        (count,) = await self.t.read(1)
        if count == 0:
            raise RFBProtocolError(f"server refused: {await self._reason()}")
        types = await self.t.read(count)
        if SECURITY_VNC_AUTH in types and self.password is not None:
            self.security_type = SECURITY_VNC_AUTH
            await self.t.send(bytes([SECURITY_VNC_AUTH]))
            challenge = await self.t.read(16)
            await self.t.send(vnc_auth_response(self.password, challenge))
        elif SECURITY_NONE in types:
            self.security_type = SECURITY_NONE
            await self.t.send(bytes([SECURITY_NONE]))
        else:
            raise RFBProtocolError(f"no usable security type among {list(types)}")
        (result,) = struct.unpack(">I", await self.t.read(4))
        if result != 0:
            raise RFBProtocolError(f"authentication failed: {await self._reason()}")
        await self.t.send(b"\x01")  # ClientInit: shared
        head = await self.t.read(24)
        self.width, self.height = struct.unpack(">HH", head[:4])
        (name_length,) = struct.unpack(">I", head[20:24])
        self.name = (await self.t.read(name_length)).decode("utf-8", "replace")
        await self.t.chunk_done()

    async def _reason(self) -> str:
        (length,) = struct.unpack(">I", await self.t.read(4))
        return (await self.t.read(length)).decode("utf-8", "replace")

    async def configure(self, encoding: int) -> None:
        """32 bpp true colour, and exactly one encoding (no pseudo-encodings)."""
        await self.t.send(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
        await self.t.send(struct.pack(">BxHi", 2, 1, encoding))

    async def request(self, incremental: bool) -> None:
        await self.t.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    # server messages -----------------------------------------------------------------------

    async def read_update(self) -> int:
        """Read server messages up to and including one FramebufferUpdate; return its rects."""
        while True:
            (kind,) = await self.t.read(1)
            if kind == 0:
                rects = await self._framebuffer_update()
                await self.t.chunk_done()
                return rects
            if kind == 1:  # SetColourMapEntries
                _pad, _first, count = struct.unpack(">BHH", await self.t.read(5))
                await self.t.skip(6 * count)
            elif kind == 2:  # Bell
                pass
            elif kind == 3:  # ServerCutText (negative length: extended clipboard)
                (length,) = struct.unpack(">3xi", await self.t.read(7))
                await self.t.skip(abs(length))
            else:
                raise RFBProtocolError(f"unexpected server message type {kind}")

    async def _framebuffer_update(self) -> int:
        (count,) = struct.unpack(">xH", await self.t.read(3))
        done = 0
        while count == 0xFFFF or done < count:
            _x, _y, w, h, encoding = struct.unpack(">HHHHi", await self.t.read(12))
            if encoding == PSEUDO_LAST_RECT:
                break
            done += 1
            if encoding == ENCODING_RAW:
                await self.t.skip(w * h * BYTES_PER_PIXEL)
            elif encoding == ENCODING_TIGHT:
                await self._tight(w, h)
            elif encoding == PSEUDO_DESKTOP_SIZE:
                self.width, self.height = w, h
            elif encoding == PSEUDO_EXTENDED_DESKTOP_SIZE:
                (screens,) = struct.unpack(">B3x", await self.t.read(4))
                await self.t.skip(16 * screens)
                self.width, self.height = w, h
            else:
                raise RFBProtocolError(f"unexpected encoding {encoding} in a {w}x{h} rectangle")
        return done

    async def _compact_length(self) -> int:
        (b,) = await self.t.read(1)
        length = b & 0x7F
        if b & 0x80:
            (b,) = await self.t.read(1)
            length |= (b & 0x7F) << 7
            if b & 0x80:
                (b,) = await self.t.read(1)
                length |= b << 14
        return length

    async def _tight(self, w: int, h: int) -> None:
        (control,) = await self.t.read(1)
        method = control >> 4
        if method == 0x08:  # fill
            await self.t.skip(TPIXEL)
            return
        if method == 0x09:  # JPEG
            await self.t.skip(await self._compact_length())
            return
        if method & 0x08:
            raise RFBProtocolError(f"unknown Tight compression control {control:#04x}")
        # basic compression; bit 6 says whether a filter id follows
        size = w * h * TPIXEL
        if control & 0x40:
            (filter_id,) = await self.t.read(1)
            if filter_id == 1:  # palette
                (colours,) = await self.t.read(1)
                colours += 1
                await self.t.skip(colours * TPIXEL)
                size = ((w + 7) // 8) * h if colours == 2 else w * h
            elif filter_id not in (0, 2):  # copy, gradient: TPIXELs
                raise RFBProtocolError(f"unknown Tight filter {filter_id}")
        if size < TIGHT_MIN_TO_COMPRESS:
            await self.t.skip(size)
        else:
            await self.t.skip(await self._compact_length())

    # measuring -----------------------------------------------------------------------------

    async def measure(self, incremental: bool, seconds: float) -> UpdateStats:
        """Request and read updates back to back for ``seconds``."""
        stats = UpdateStats()
        start = time.perf_counter()
        deadline = start + seconds
        now = start
        while now < deadline:
            before = self.t.consumed
            sent = time.perf_counter()
            await self.request(incremental)
            first = await self.t.wait_data()
            stats.rects += await self.read_update()
            now = time.perf_counter()
            stats.latencies.append(first - sent)
            stats.updates += 1
            stats.bytes += self.t.consumed - before
        stats.seconds = now - start
        return stats

"""The screen relay: one browser websocket <-> the sandbox's VNC server.

Wire protocol on ``/ws/sandboxes/<id>/screen/`` (subprotocol ``binary``):

* binary frames, both ways: the RFB byte stream (RFC 6143), as with websockify;
* text frames, browser to server only: ``{"type": "ack", "bytes": N}``, where N is the
  total number of binary payload bytes the browser has received so far.

Namek authenticates to the VNC server itself (VncAuth with the sandbox's password) and
then offers the browser RFB 3.8 with the single security type None: the password never
leaves the server. After ClientInit the browser's messages are parsed one by one
(``sandboxes.rfb.ClientStreamParser``), so that input can be filtered per connection.

Flow control: Daphne buffers whatever a consumer sends, without bound (django/daphne#170).
The relay therefore stops reading from the VNC server once ``window`` bytes are
unacknowledged, so the VNC server itself waits; a browser that acknowledges nothing for
``stall_seconds`` while the window is full is closed with 4408. Memory per connection is
bounded by the window plus one read and the stream reader's buffer (about 1.5 MiB).
Autobahn gives a peer one second to answer a close frame: a browser that reads nothing
at all sees its connection reset rather than the 4408.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from sandboxes import rfb
from sandboxes.backends.base import ScreenTarget
from viewer.closecodes import Close

log = logging.getLogger(__name__)

#: biggest binary frame a browser may send (a clipboard of MAX_CUT_TEXT plus headers)
MAX_CUT_TEXT = 1024 * 1024
MAX_BROWSER_FRAME = MAX_CUT_TEXT + 64
#: read size from the VNC server: what is buffered goes out as one frame. It must stay
#: below Daphne's websocket-max-message-size (namek_web.serve), which autobahn also
#: enforces on the messages we send (PayloadExceededError).
READ_CHUNK = 512 * 1024
#: browser messages per second, sustained and in a burst
RATE_PER_SECOND = 1000.0
RATE_BURST = 2000.0

SendBytes = Callable[[bytes], Awaitable[None]]
CloseWith = Callable[[Close, str], Awaitable[None]]


class RelayClosed(Exception):
    def __init__(self, code: Close, detail: str = "") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ScreenRelay:
    # Browser handshake states
    WANT_VERSION, WANT_SECURITY, WANT_CLIENT_INIT, MESSAGES = range(4)

    def __init__(
        self,
        target: ScreenTarget,
        send_bytes: SendBytes,
        close_with: CloseWith,
        *,
        window: int,
        stall_seconds: float,
        on_input: Callable[[int], None] | None = None,
        recheck: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.target = target
        #: told the type of every input message forwarded
        self.on_input = on_input
        #: awaited before input is dropped: it may find that control was just granted
        self.recheck = recheck
        self.send_bytes = send_bytes
        self.close_with = close_with
        self.window = window
        self.stall_seconds = stall_seconds
        #: whether this connection's input reaches the screen: its user holds control
        self.may_input = False
        self.sent = 0
        self.acked = 0
        self.dropped_inputs = 0
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._state = self.WANT_VERSION
        self._handshake = bytearray()
        self._parser = rfb.ClientStreamParser(MAX_CUT_TEXT)
        self._bucket = TokenBucket(RATE_PER_SECOND, RATE_BURST)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and authenticate upstream, then greet the browser. Raises RelayClosed."""
        endpoint = self.target.endpoint
        try:
            if endpoint.unix_path:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(endpoint.unix_path, limit=READ_CHUNK), 5
                )
            else:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(endpoint.host, endpoint.port, limit=READ_CHUNK), 5
                )
                sock = self._writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(rfb.authenticate(self._reader, self._writer, self.target.password), 5)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, rfb.RFBError) as exc:
            await self.stop()
            log.warning("screen relay: upstream %s: %s", endpoint.describe(), exc)
            raise RelayClosed(Close.UNREACHABLE, "the screen does not answer") from None
        await self._to_browser(rfb.PROTOCOL_VERSION)

    async def _to_browser(self, data: bytes) -> None:
        """Every byte to the browser counts towards the window, handshake included."""
        self.sent += len(data)
        if self.sent - self.acked >= self.window:
            self._window_open.clear()
        await self.send_bytes(data)

    async def stop(self) -> None:
        if self._pump and self._pump is not asyncio.current_task():
            self._pump.cancel()
        if self._writer:
            with contextlib.suppress(Exception):
                self._writer.close()

    # --- browser -> server ------------------------------------------------------------

    async def from_browser_text(self, text: str) -> None:
        if len(text) > 256:
            raise RelayClosed(Close.TOO_BIG, "text frames carry only acknowledgements")
        try:
            message = json.loads(text)
            count = message["bytes"] if message.get("type") == "ack" else None
        except (ValueError, AttributeError, TypeError, KeyError):
            count = None
        if not isinstance(count, int) or isinstance(count, bool) or not self.acked <= count <= self.sent:
            raise RelayClosed(Close.BAD_MESSAGE, 'expected {"type": "ack", "bytes": N}')
        self.acked = count
        if self.sent - self.acked < self.window:
            self._window_open.set()

    async def from_browser(self, data: bytes) -> None:
        if len(data) > MAX_BROWSER_FRAME:
            raise RelayClosed(Close.TOO_BIG, f"frames of at most {MAX_BROWSER_FRAME} bytes")
        if not self._bucket.take():
            raise RelayClosed(Close.RATE_LIMITED)
        if self._state != self.MESSAGES:
            await self._browser_handshake(data)
            return
        try:
            messages = self._parser.feed(data)
        except rfb.MessageTooBig as exc:
            raise RelayClosed(Close.TOO_BIG, str(exc)) from None
        except rfb.ProtocolViolation as exc:
            raise RelayClosed(Close.BAD_MESSAGE, str(exc)) from None
        assert self._writer
        for message in messages:
            if message.type in rfb.INPUT_MESSAGES:
                if not self.may_input and self.recheck is not None:
                    await self.recheck()
                if not self.may_input:
                    self.dropped_inputs += 1
                    continue
                if self.on_input is not None:
                    self.on_input(message.type)
            self._writer.write(message.data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _browser_handshake(self, data: bytes) -> None:
        self._handshake += data
        while self._state != self.MESSAGES:
            if self._state == self.WANT_VERSION:
                if len(self._handshake) < 12:
                    return
                version, self._handshake = bytes(self._handshake[:12]), self._handshake[12:]
                if version != rfb.PROTOCOL_VERSION:
                    raise RelayClosed(Close.BAD_MESSAGE, f"only RFB 3.8 is spoken here, not {version[:11]!r}")
                await self._to_browser(bytes([1, rfb.SECURITY_NONE]))
                self._state = self.WANT_SECURITY
            elif self._state == self.WANT_SECURITY:
                if not self._handshake:
                    return
                choice, self._handshake = self._handshake[0], self._handshake[1:]
                if choice != rfb.SECURITY_NONE:
                    raise RelayClosed(Close.BAD_MESSAGE, "only security type None is offered")
                await self._to_browser(struct.pack(">I", 0))
                self._state = self.WANT_CLIENT_INIT
            elif self._state == self.WANT_CLIENT_INIT:
                if not self._handshake:
                    return
                client_init, rest = bytes(self._handshake[:1]), bytes(self._handshake[1:])
                self._handshake = bytearray()
                assert self._writer
                self._writer.write(client_init)
                self._state = self.MESSAGES
                self._pump = asyncio.ensure_future(self._pump_upstream())
                if rest:
                    await self.from_browser(rest)

    # --- server -> browser ------------------------------------------------------------

    async def _pump_upstream(self) -> None:
        assert self._reader
        try:
            while True:
                if not self._window_open.is_set():
                    try:
                        await asyncio.wait_for(self._window_open.wait(), self.stall_seconds)
                    except TimeoutError:
                        raise RelayClosed(Close.TOO_SLOW, f"{self.sent - self.acked} bytes unacknowledged") from None
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    raise RelayClosed(Close.NORMAL, "the screen closed")
                await self._to_browser(data)
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)
        except (ConnectionError, OSError) as exc:
            await self.close_with(Close.UNREACHABLE, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never leave the browser with an open socket and a dead pump (a frozen screen).
            log.exception("screen relay: pump failed")
            await self.close_with(Close.UNREACHABLE, "relay error")
        finally:
            if self._writer:
                with contextlib.suppress(Exception):
                    self._writer.close()

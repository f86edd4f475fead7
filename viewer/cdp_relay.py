"""The CDP relay: one client websocket <-> the browser-level DevTools websocket of a
sandbox's Chromium.

Wire protocol on ``/ws/sandboxes/<id>/cdp/``: the Chrome DevTools Protocol itself, one
JSON message per text frame, as Chromium's ``/devtools/browser/<uuid>`` speaks it (flat
sessions included). A client message must be a JSON object with an integer ``id`` and a
string ``method``; anything else (binary frames, malformed JSON, other shapes) closes the
socket with 4400 and never reaches Chromium. Nothing else is filtered: for those allowed
it is full control of the browser — except while a person holds the sandbox's control
lease: then the commands of every other connection (the agent's included) are held, in
order, and forwarded when control is handed back (``hold``/``release``; only
``PASS_WHILE_HELD`` goes through; more than ``MAX_HELD`` bytes held closes with 4429).
Responses and events from Chromium keep flowing.

Upstream: ``GET /json/version`` over the sandbox's DevTools socket gives the path of the
browser endpoint, then a websocket (``websockets``) opens on that path over the same
socket. No keepalive pings upstream (a local socket; a dead Chromium closes it).

Memory bounds per connection:

* client -> Chromium: Daphne refuses frames and messages over ``WEBSOCKET_MAX_BYTES``
  (4 MiB, ``namek_web.serve``) itself: Autobahn drops the TCP connection without a close
  frame (its ``failByDrop``), so the client sees 1006. The relay closes messages over
  ``MAX_CLIENT_MESSAGE`` (2 MiB, room for Playwright's injected scripts and
  ``page.setContent``) with 4413. A command Chromium does not take within
  ``stall_seconds`` closes with 1011.
* Chromium -> client: Daphne has no backpressure (django/daphne#170): whatever a consumer
  sends is queued in the Twisted transport without bound. A CDP client sends no
  acknowledgements, so the relay watches that queue instead (``unflushed``, see
  ``viewer.consumers.cdp.daphne_unflushed``): it reads the next message from Chromium
  only while at most ``window`` bytes (1 MiB) wait there for the client. Daphne then holds
  at most ``window`` + one message (<= 4 MiB), and the upstream connection at most
  ``UPSTREAM_QUEUE`` + 1 frames before it stops reading and Chromium waits (measured: a
  client that reads none of 90 MiB of 3 MiB responses grows Daphne by ~20 MiB, ~90 MiB
  without the window). A client that takes nothing for ``stall_seconds`` while the
  window is full is closed with 4408 (else Chromium would buffer its output in the
  sandbox); Autobahn resets a peer that does not answer that close within 1 s. Where the
  queue cannot be observed (another ASGI server, TLS in Twisted) nothing bounds it but
  the server's keepalive, which drops a client that reads nothing (and so answers no
  ping) within ping interval + timeout (50 s with ``namek_web.serve``); a warning says so.
* Autobahn (under Daphne) refuses to send a message over ``WEBSOCKET_MAX_BYTES`` too. A
  response from Chromium that is bigger (a full-page screenshot of a long page) becomes
  a CDP error response to the same ``id`` and session, so the client's call fails
  instead of hanging and the session goes on; a bigger event is dropped (and counted).
  Messages over ``UPSTREAM_MAX_MESSAGE`` (64 MiB) end the connection with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from namek_web.serve import WEBSOCKET_MAX_BYTES
from sandboxes.backends.base import Endpoint
from viewer.closecodes import Close
from viewer.frames import is_int
from viewer.screen_relay import RelayClosed

log = logging.getLogger(__name__)

#: biggest client message forwarded to Chromium (UTF-8 bytes); bigger closes with 4413.
#: Below Daphne's own limit, so that the client learns why.
MAX_CLIENT_MESSAGE = 2 * 1024 * 1024
#: biggest message sent to the client: autobahn refuses to send more (PayloadExceededError)
MAX_TO_CLIENT = WEBSOCKET_MAX_BYTES
#: biggest message read from Chromium: a response up to this size still becomes an error
#: response (instead of ending the connection)
UPSTREAM_MAX_MESSAGE = 64 * 1024 * 1024
#: frames the upstream connection queues before it stops reading from Chromium
UPSTREAM_QUEUE = 2
#: bytes queued in Daphne for the client above which the relay stops reading upstream
WINDOW = 1024 * 1024
#: ``/json/version`` is a few hundred bytes
MAX_VERSION_BODY = 64 * 1024
CONNECT_TIMEOUT = 5.0
#: how long closing the upstream connection may wait for Chromium's close frame
UPSTREAM_CLOSE_TIMEOUT = 2.0
#: CDP's "server error" code, which Chromium uses for failed commands
CDP_SERVER_ERROR = -32000
#: commands that pass while the connection is held (a person drives): they cannot change
#: what a page shows or does, and a new tab would otherwise wait for its debugger
PASS_WHILE_HELD = frozenset(
    {
        "Browser.getVersion",
        "Target.getTargets",
        "Target.getTargetInfo",
        "Target.setDiscoverTargets",
        "Target.setAutoAttach",
        "Target.attachToTarget",
        "Target.attachToBrowserTarget",
        "Target.detachFromTarget",
        "Runtime.runIfWaitingForDebugger",
    }
)
#: bytes of commands held at most; more closes the connection with 4429
MAX_HELD = 4 * 1024 * 1024

SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]
CloseWith = Callable[[Close, str], Awaitable[None]]
Unflushed = Callable[[], "int | None"]


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_command(text: str) -> str:
    """The method of ``text`` if it is a CDP command ({"id": int, "method": str, ...});
    else raise RelayClosed."""
    # A character is at most 4 UTF-8 bytes: only long texts need counting.
    if len(text) > MAX_CLIENT_MESSAGE // 4 and utf8_size(text) > MAX_CLIENT_MESSAGE:
        raise RelayClosed(Close.TOO_BIG, f"commands of at most {MAX_CLIENT_MESSAGE} bytes")
    try:
        message = json.loads(text)
    except ValueError:  # JSONDecodeError
        raise RelayClosed(Close.BAD_MESSAGE, "not JSON") from None
    except RecursionError:  # "[[[[...": the parser's own stack
        raise RelayClosed(Close.BAD_MESSAGE, "nested too deeply") from None
    if not isinstance(message, dict):
        raise RelayClosed(Close.BAD_MESSAGE, 'expected a CDP command {"id": int, "method": str}')
    command_id, method = message.get("id"), message.get("method")
    if not is_int(command_id) or not isinstance(method, str):
        raise RelayClosed(Close.BAD_MESSAGE, 'expected a CDP command {"id": int, "method": str}')
    return method


async def browser_path(endpoint: Endpoint) -> str:
    """The path of Chromium's browser-level websocket, from ``GET /json/version``."""
    if endpoint.unix_path:
        reader, writer = await asyncio.open_unix_connection(endpoint.unix_path)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        # Chromium's DevTools accept only an IP address or "localhost" as Host.
        writer.write(b"GET /json/version HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
        if status != b"200":
            raise ValueError(f"/json/version answered HTTP {status.decode(errors='replace')}")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None or not 0 < length <= MAX_VERSION_BODY:
            raise ValueError(f"/json/version has a body of {length} bytes")
        body = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    path = urlsplit(json.loads(body)["webSocketDebuggerUrl"]).path
    if not path.startswith("/devtools/browser/"):
        raise ValueError(f"unexpected browser endpoint {path[:80]!r}")
    return path


class CdpRelay:
    def __init__(
        self,
        endpoint: Endpoint,
        send_text: SendText,
        send_bytes: SendBytes,
        close_with: CloseWith,
        *,
        unflushed: Unflushed | None,
        stall_seconds: float,
        window: int = WINDOW,
    ) -> None:
        self.endpoint = endpoint
        self.send_text = send_text
        self.send_bytes = send_bytes
        self.close_with = close_with
        #: bytes sent to the client and not yet handed to the kernel; None if unknown
        self.unflushed = unflushed or (lambda: None)
        self.stall_seconds = stall_seconds
        self.window = window
        # Counters for the close log line
        self.commands = self.commands_bytes = 0
        self.messages = self.messages_bytes = 0
        self.oversize_responses = self.dropped_events = 0
        self.stalls = 0
        self.held_total = 0
        #: commands held while a person drives (None: forwarding)
        self._held: deque[str] | None = None
        self._held_bytes = 0
        self._upstream: ClientConnection | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Find and open Chromium's browser endpoint, then relay. Raises RelayClosed."""
        where = self.endpoint.describe()
        try:
            path = await asyncio.wait_for(browser_path(self.endpoint), CONNECT_TIMEOUT)
        except Exception as exc:  # timeouts, OSError, bad HTTP or JSON: all mean the same here
            log.warning("cdp relay: %s /json/version: %r", where, exc)
            raise RelayClosed(Close.UNREACHABLE, "the browser's DevTools do not answer") from None
        options: dict[str, Any] = {
            "max_size": UPSTREAM_MAX_MESSAGE,
            "max_queue": UPSTREAM_QUEUE,
            "compression": None,
            "ping_interval": None,
            "open_timeout": CONNECT_TIMEOUT,
            "close_timeout": UPSTREAM_CLOSE_TIMEOUT,
        }
        uri = "ws://localhost" + path
        try:
            if self.endpoint.unix_path:
                self._upstream = await unix_connect(self.endpoint.unix_path, uri, **options)
            else:
                self._upstream = await connect(uri, host=self.endpoint.host, port=self.endpoint.port, **options)
        except Exception as exc:  # OSError, TimeoutError, InvalidHandshake, ...
            log.warning("cdp relay: %s %s: %r", where, path, exc)
            raise RelayClosed(Close.UNREACHABLE, "the browser's DevTools do not answer") from None
        self._pump = asyncio.create_task(self._pump_upstream(), name=f"cdp relay {where}")

    async def stop(self) -> None:
        """End the pump and close the upstream connection; waits for both (<= 2 s)."""
        pump, self._pump = self._pump, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            try:
                with contextlib.suppress(Exception):
                    await upstream.close()
            finally:
                upstream.transport.abort()  # if the close handshake was cut short; else a no-op

    # --- client -> Chromium -----------------------------------------------------------

    def hold(self) -> None:
        """Keep the client's commands (but ``PASS_WHILE_HELD``) until ``release``."""
        if self._held is None:
            self._held, self._held_bytes = deque(), 0

    @property
    def holding(self) -> bool:
        return self._held is not None

    async def release(self) -> None:
        """Forward the held commands, in order, and forward again."""
        held, self._held = self._held, None
        while held:
            await self._forward(held.popleft())

    async def from_client(self, text: str | None, data: bytes | None) -> None:
        """Forward one client message (or hold it). Raises RelayClosed."""
        if text is None:
            raise RelayClosed(Close.BAD_MESSAGE, "binary frames are not CDP")
        method = check_command(text)
        if self._held is not None and method not in PASS_WHILE_HELD:
            self._held_bytes += len(text)
            if self._held_bytes > MAX_HELD:
                raise RelayClosed(Close.RATE_LIMITED, f"over {MAX_HELD} bytes of commands held while a person drives")
            self._held.append(text)
            self.held_total += 1
            return
        await self._forward(text)

    async def _forward(self, text: str) -> None:
        if self._upstream is None:
            return
        try:
            await asyncio.wait_for(self._upstream.send(text), self.stall_seconds)
        except TimeoutError:
            raise RelayClosed(Close.UNREACHABLE, "the browser does not take commands") from None
        except ConnectionClosed:
            raise RelayClosed(Close.UNREACHABLE, "the browser closed the DevTools connection") from None
        self.commands += 1
        self.commands_bytes += len(text)

    # --- Chromium -> client -----------------------------------------------------------

    async def _pump_upstream(self) -> None:
        assert self._upstream is not None
        try:
            try:
                async for message in self._upstream:
                    await self._wait_for_room()
                    await self._to_client(message)
            except ConnectionClosed as closed:
                if closed.sent is not None and closed.sent.code == 1009:  # over max_size
                    raise RelayClosed(
                        Close.UNREACHABLE, f"a browser message over {UPSTREAM_MAX_MESSAGE} bytes"
                    ) from None
            raise RelayClosed(Close.UNREACHABLE, "the browser closed the DevTools connection")
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never leave a client with an open socket and a dead pump.
            log.exception("cdp relay: pump failed")
            await self.close_with(Close.UNREACHABLE, "relay error")

    async def _wait_for_room(self) -> None:
        """Return once at most ``window`` bytes wait in Daphne for the client."""
        pending = self.unflushed()
        if pending is None or pending <= self.window:
            return
        self.stalls += 1
        deadline = time.monotonic() + self.stall_seconds
        delay = 0.002
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            pending = self.unflushed()
            if pending is None or pending <= self.window:
                return
            if time.monotonic() >= deadline:
                raise RelayClosed(Close.TOO_SLOW, f"{pending} bytes not taken for {self.stall_seconds:g} s")

    async def _to_client(self, message: str | bytes) -> None:
        size = utf8_size(message) if isinstance(message, str) else len(message)
        if size > MAX_TO_CLIENT:
            await self._too_big_for_client(message, size)
            return
        self.messages += 1
        self.messages_bytes += size
        if isinstance(message, str):
            await self.send_text(message)
        else:
            await self.send_bytes(message)

    async def _too_big_for_client(self, message: str | bytes, size: int) -> None:
        """A response becomes an error for the same id and session; an event is dropped."""
        try:
            parsed = json.loads(message)
        except ValueError:
            parsed = None
        command_id = parsed.get("id") if isinstance(parsed, dict) else None
        if not is_int(command_id):
            self.dropped_events += 1
            method = parsed.get("method") if isinstance(parsed, dict) else None
            log.warning("cdp relay: dropped a %d-byte message (%s) over the client limit", size, method)
            return
        self.oversize_responses += 1
        error: dict[str, Any] = {
            "id": command_id,
            "error": {
                "code": CDP_SERVER_ERROR,
                "message": f"Namek: the response is {size} bytes, over the relay's limit of {MAX_TO_CLIENT}",
            },
        }
        if isinstance(parsed, dict) and isinstance(parsed.get("sessionId"), str):
            error["sessionId"] = parsed["sessionId"]
        log.warning("cdp relay: a %d-byte response to %s over the client limit became an error", size, command_id)
        await self.send_text(json.dumps(error))

    def stats(self) -> str:
        text = (
            f"{self.commands} commands ({self.commands_bytes} B) in, "
            f"{self.messages} messages ({self.messages_bytes} B) out"
        )
        if self.stalls:
            text += f", waited for the client {self.stalls} times"
        if self.held_total:
            text += f", {self.held_total} commands held while a person drove"
        if self.oversize_responses or self.dropped_events:
            text += f", {self.oversize_responses} oversize responses, {self.dropped_events} oversize events dropped"
        return text

"""The screen relay against a real Namek: handshake, password secrecy, flow control, bad
input, and input reaching the sandbox's browser.

Wire protocol: see the docstring of ``viewer/screen_relay.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.cookiejar
import json
import os
import re
import socket
import struct
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from sandboxes import rfb
from tests import cast
from tests.live import LiveNamek, ready_sandbox
from viewer.closecodes import REASONS, Close
from viewer.screen_relay import READ_CHUNK

pytestmark = pytest.mark.processes

WIDTH, HEIGHT = 1280, 800
#: what the live_namek fixture configures (tests/conftest.py)
RELAY_WINDOW = 2 * 1024 * 1024
STALL_SECONDS = 3.0
#: Daphne's default websocket_max_message_size, enforced by autobahn in both directions
DAPHNE_MAX_MESSAGE = 1024 * 1024
ENCODING_RAW = 0


@pytest.fixture(scope="module")
def screen_sandbox(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    """One ready sandbox shared by this module's tests (a sandbox takes seconds to start)."""
    with ready_sandbox(live_namek, name="relay-tests") as created:
        yield created


# --- an RFB client over the relay websocket ----------------------------------------------


def relay_url(live: LiveNamek, sandbox_id: int) -> str:
    return f"{live.ws_base}/ws/sandboxes/{sandbox_id}/screen/"


@contextlib.asynccontextmanager
async def open_relay(live: LiveNamek, sandbox_id: int, who: str = "owner") -> AsyncIterator[ClientConnection]:
    async with connect(
        relay_url(live, sandbox_id),
        subprotocols=["binary"],
        max_size=None,
        compression=None,
        additional_headers={"Authorization": f"Bearer {live.token(who)}"},
        open_timeout=10,
        close_timeout=2,
    ) as ws:
        assert ws.subprotocol == "binary"
        yield ws


def set_encodings(*encodings: int) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", rfb.MSG_SET_ENCODINGS, len(encodings), *encodings)


def update_request(incremental: bool = False, x: int = 0, y: int = 0, w: int = WIDTH, h: int = HEIGHT) -> bytes:
    return struct.pack(">BBHHHH", rfb.MSG_FB_UPDATE_REQUEST, int(incremental), x, y, w, h)


def pointer_event(mask: int, x: int, y: int) -> bytes:
    return struct.pack(">BBHH", rfb.MSG_POINTER_EVENT, mask, x, y)


def key_event(down: bool, keysym: int) -> bytes:
    return struct.pack(">BBxxI", rfb.MSG_KEY_EVENT, int(down), keysym)


class RelayClient:
    """The browser's side of the relay: RFB over binary frames, acknowledging what it got."""

    def __init__(self, ws: ClientConnection, *, ack: bool = True) -> None:
        self.ws = ws
        self.ack = ack
        self.buffer = bytearray()
        self.received = 0
        self.acked = 0
        self.frames: list[bytes] = []
        self.bytes_per_pixel = 4
        self.security_types: list[int] = []

    async def _more(self) -> None:
        message = await asyncio.wait_for(self.ws.recv(), 10)
        assert isinstance(message, bytes), f"the relay sent a text frame: {message!r}"
        self.frames.append(message)
        self.buffer += message
        self.received += len(message)
        if self.ack and self.received > self.acked:
            self.acked = self.received
            await self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))

    async def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            await self._more()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def handshake(self) -> rfb.ServerInit:
        """RFB 3.8 with security type None, up to the ServerInit."""
        assert await self.read(12) == rfb.PROTOCOL_VERSION
        await self.ws.send(rfb.PROTOCOL_VERSION)
        (count,) = await self.read(1)
        self.security_types = list(await self.read(count))
        await self.ws.send(bytes([rfb.SECURITY_NONE]))
        assert struct.unpack(">I", await self.read(4)) == (0,), "SecurityResult: failed"
        await self.ws.send(b"\x01")  # ClientInit: shared
        head = await self.read(24)
        (name_length,) = struct.unpack(">I", head[20:24])
        name = await self.read(name_length)
        self.bytes_per_pixel = head[4] // 8
        width, height = struct.unpack(">HH", head[:4])
        return rfb.ServerInit(width, height, name.decode(), head + name)

    async def read_update(self) -> list[tuple[int, int, int, int]]:
        """The next FramebufferUpdate (skipping Bell and ServerCutText): its rectangles."""
        while True:
            (kind,) = await self.read(1)
            if kind == 0:
                break
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack(">xxxI", await self.read(7))
                await self.read(length)
                continue
            raise AssertionError(f"unexpected server message type {kind}")
        (count,) = struct.unpack(">xH", await self.read(3))
        rects = []
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
            assert encoding == ENCODING_RAW, f"asked for Raw only, got encoding {encoding}"
            await self.read(w * h * self.bytes_per_pixel)
            rects.append((x, y, w, h))
        return rects

    async def full_update(self) -> list[tuple[int, int, int, int]]:
        await self.ws.send(update_request(incremental=False))
        return await self.read_update()


async def close_of(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    """Read until the server closes; the close frame's code and reason."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, f"the connection ended without a close frame: {closed}"
        return closed.rcvd.code, closed.rcvd.reason
    except TimeoutError:
        raise AssertionError(f"the relay did not close the connection within {timeout} s") from None


def covered_area(rects: list[tuple[int, int, int, int]]) -> int:
    return sum(w * h for _x, _y, w, h in rects)


async def assert_screen_still_served(live: LiveNamek, sandbox_id: int) -> None:
    async with open_relay(live, sandbox_id) as ws:
        client = RelayClient(ws)
        init = await client.handshake()
        assert (init.width, init.height) == (WIDTH, HEIGHT)
        await ws.send(set_encodings(ENCODING_RAW))
        assert covered_area(await client.full_update()) >= WIDTH * HEIGHT


# --- 1. the handshake the browser sees -----------------------------------------------------


async def test_browser_is_offered_only_security_none_and_gets_the_screen_size_and_updates(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    assert screen_sandbox["screen"] == f"{WIDTH}x{HEIGHT}"
    async with open_relay(live_namek, screen_sandbox["id"]) as ws:
        client = RelayClient(ws)
        init = await client.handshake()
        assert client.security_types == [rfb.SECURITY_NONE]
        assert (init.width, init.height) == (WIDTH, HEIGHT)
        assert init.name == "namek"
        await ws.send(set_encodings(ENCODING_RAW))
        rects = await client.full_update()
        assert rects, "a FramebufferUpdate without rectangles"
        assert covered_area(rects) >= WIDTH * HEIGHT, f"a full update should cover the screen: {rects}"
        assert all(x + w <= WIDTH and y + h <= HEIGHT for x, y, w, h in rects)
        # A second request is answered too: the acknowledgements kept the window open.
        assert covered_area(await client.full_update()) >= WIDTH * HEIGHT
        assert client.received > 2 * WIDTH * HEIGHT * client.bytes_per_pixel
        assert max(map(len, client.frames)) <= DAPHNE_MAX_MESSAGE


async def test_a_browser_that_pauses_with_the_window_full_then_acknowledges_gets_the_whole_update(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    """While the window is full the relay's upstream buffer fills up; once acknowledged,
    what it then reads must still go out in frames Daphne accepts (at most 1 MiB), or the
    relay's pump dies and the screen freezes."""
    async with open_relay(live_namek, screen_sandbox["id"]) as ws:
        client = RelayClient(ws)
        await client.handshake()
        await ws.send(set_encodings(ENCODING_RAW))
        await ws.send(update_request(incremental=False))
        # No acknowledgement for a second: the relay stops at the window (2 MiB of the
        # 4 MB update) and its upstream buffer fills with the rest.
        await asyncio.sleep(1)
        rects = await client.read_update()
        assert covered_area(rects) >= WIDTH * HEIGHT
        assert covered_area(await client.full_update()) >= WIDTH * HEIGHT
        assert max(map(len, client.frames)) <= DAPHNE_MAX_MESSAGE


# --- 2. the VNC server itself wants the password ---------------------------------------------


async def vnc_security_types(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
    assert (await reader.readexactly(12)).startswith(b"RFB 003.")
    writer.write(rfb.PROTOCOL_VERSION)
    (count,) = await reader.readexactly(1)
    return list(await reader.readexactly(count))


async def vnc_auth_result(path: str, password: str) -> tuple[list[int], int, str]:
    """Security types offered, SecurityResult and its reason for a VncAuth attempt."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        async with asyncio.timeout(10):
            types = await vnc_security_types(reader, writer)
            writer.write(bytes([rfb.SECURITY_VNC_AUTH]))
            challenge = await reader.readexactly(16)
            writer.write(rfb.vnc_auth_response(password, challenge))
            (result,) = struct.unpack(">I", await reader.readexactly(4))
            reason = ""
            if result != 0:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                reason = (await reader.readexactly(length)).decode(errors="replace")
            return types, result, reason
    finally:
        writer.close()


async def test_vnc_server_offers_only_vncauth_and_refuses_a_wrong_password(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    path, password = live_namek.screen_target(screen_sandbox["id"])
    wrong = "".join(chr(ord(c) ^ 1) for c in password)  # differs in every character
    assert wrong[:8] != password[:8]

    types, result, reason = await vnc_auth_result(path, wrong)
    assert types == [rfb.SECURITY_VNC_AUTH], f"the VNC server offers {types}, not only VncAuth"
    assert rfb.SECURITY_NONE not in types
    assert result == 1, f"a wrong password got SecurityResult {result}"
    print(f"wrong password refused: {reason!r}")

    # Choosing None although it is not offered does not get in either.
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        async with asyncio.timeout(10):
            await vnc_security_types(reader, writer)
            writer.write(bytes([rfb.SECURITY_NONE]))
            answer = await reader.read(4)
            assert answer != b"\x00\x00\x00\x00", "security type None was accepted"
    finally:
        writer.close()

    # The right password works: the refusals above were about the password.
    types, result, _reason = await vnc_auth_result(path, password)
    assert result == 0


# --- 3. the password never reaches a browser -----------------------------------------------


def _b64_forms(secret: bytes) -> dict[str, bytes]:
    """Base64 text of ``secret`` at each alignment inside a longer stream (standard and
    urlsafe): the characters that depend on ``secret`` alone, plus the padded form."""
    forms = {"base64": base64.b64encode(secret), "base64url": base64.urlsafe_b64encode(secret)}
    for shift in range(3):
        first = -(-8 * shift // 6)
        last = (8 * shift + 8 * len(secret)) // 6
        core = base64.b64encode(bytes(shift) + secret + bytes(3))[first:last]
        forms[f"base64@{shift}"] = core
        forms[f"base64url@{shift}"] = core.replace(b"+", b"-").replace(b"/", b"_")
        forms[f"base64-unpadded@{shift}"] = core.rstrip(b"=")
    return forms


def secret_forms(password: str) -> dict[str, bytes]:
    raw = password.encode()
    obfuscated = rfb.obfuscate_password(password)
    forms = {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "vncpasswd": obfuscated,
        "vncpasswd-hex": obfuscated.hex().encode(),
        "vncpasswd-HEX": obfuscated.hex().upper().encode(),
    }
    forms.update(_b64_forms(raw))
    forms.update({f"vncpasswd-{k}": v for k, v in _b64_forms(obfuscated).items()})
    return forms


def logged_in_pages(live: LiveNamek, sandbox_id: int) -> dict[str, bytes]:
    """The HTML of the dashboard and the sandbox page, logged in with the login form."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login_url = live.base_url + "/login/"
    with opener.open(login_url, timeout=30) as response:
        login_page = response.read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": "owner", "password": cast.PASSWORD, "csrfmiddlewaretoken": csrf}
    ).encode()
    request = urllib.request.Request(login_url, data=form, headers={"Referer": login_url})
    with opener.open(request, timeout=30) as response:
        dashboard = response.read()
        assert urllib.parse.urlsplit(response.url).path == "/", f"login failed: ended at {response.url}"
        dashboard_headers = str(response.headers).encode()
    with opener.open(f"{live.base_url}/sandboxes/{sandbox_id}/", timeout=30) as response:
        sandbox_page = response.read()
        sandbox_headers = str(response.headers).encode()
    assert b"relay-tests" in sandbox_page
    return {
        "login page": login_page,
        "dashboard": dashboard + dashboard_headers,
        "sandbox page": sandbox_page + sandbox_headers,
    }


def api_bodies(live: LiveNamek, sandbox_id: int) -> dict[str, bytes]:
    bodies = {}
    for who in ("owner", "staff"):
        for path in ("/api/sandboxes", "/api/sandboxes?all=1", f"/api/sandboxes/{sandbox_id}"):
            status, body = live.api("GET", path, who)
            assert status == 200, body
            bodies[f"API {path} as {who}"] = json.dumps(body).encode()
    return bodies


async def dashboard_messages(live: LiveNamek) -> bytes:
    received = bytearray()
    async with connect(
        f"{live.ws_base}/ws/sandboxes/",
        additional_headers={"Authorization": f"Bearer {live.token('owner')}"},
        open_timeout=10,
    ) as ws:
        first = await asyncio.wait_for(ws.recv(), 10)
        assert json.loads(first)["type"] == "snapshot"
        received += first.encode() if isinstance(first, str) else first
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                message = await asyncio.wait_for(ws.recv(), 0.5)
                received += message.encode() if isinstance(message, str) else message
    return bytes(received)


async def test_no_frame_or_page_sent_to_a_browser_contains_the_vnc_password(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    sandbox_id = screen_sandbox["id"]
    _path, password = live_namek.screen_target(sandbox_id)
    assert len(password) >= 8

    seen: dict[str, bytes] = {}
    async with open_relay(live_namek, sandbox_id) as ws:
        client = RelayClient(ws)
        await client.handshake()
        await ws.send(set_encodings(ENCODING_RAW))
        for _ in range(3):
            await client.full_update()
        await ws.send(update_request(incremental=False, x=100, y=100, w=300, h=200))
        await client.read_update()
        seen["relay session"] = b"".join(client.frames)
    seen["dashboard websocket"] = await dashboard_messages(live_namek)
    seen.update(await asyncio.to_thread(logged_in_pages, live_namek, sandbox_id))
    seen.update(await asyncio.to_thread(api_bodies, live_namek, sandbox_id))
    assert len(seen["relay session"]) > 3 * WIDTH * HEIGHT

    leaks = [
        f"{where} contains the password as {form}"
        for where, data in seen.items()
        for form, needle in secret_forms(password).items()
        if needle in data
    ]
    assert not leaks, leaks
    print(f"checked {sum(map(len, seen.values()))} bytes in {len(seen)} places: no password")


# --- 4. a browser that does not read ---------------------------------------------------------


class RawWebSocket:
    """A websocket client that reads only when told to: no background reader, a small
    receive buffer, so that what the server sends piles up on the server's side."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.buffer = b""
        try:
            self.sock.connect((host, port))
            key = base64.b64encode(os.urandom(16)).decode()
            request = [
                f"GET {path} HTTP/1.1",
                f"Host: {host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Protocol: binary",
                *(f"{name}: {value}" for name, value in headers.items()),
            ]
            self.sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
            while b"\r\n\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during the upgrade")
                self.buffer += chunk
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101"), head
        except BaseException:
            self.sock.close()
            raise

    def send(self, payload: bytes, opcode: int = 2) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the TCP connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; the server does not fragment."""
        first, second = self._exactly(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", self._exactly(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", self._exactly(8))
        return first & 0x0F, self._exactly(size)

    def read_binary(self, count: int) -> bytes:
        """Binary payload bytes up to ``count``: the handshake only (frames never split
        a handshake message here, the relay sends each one whole)."""
        data = b""
        while len(data) < count:
            opcode, payload = self.recv_frame()
            assert opcode == 2, (opcode, payload)
            data += payload
        assert len(data) == count, data
        return data

    def close(self) -> None:
        self.sock.close()


def test_a_browser_that_never_reads_keeps_daphne_memory_bounded_and_is_closed_with_4408(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    assert live_namek.daphne is not None
    daphne = psutil.Process(live_namek.daphne.pid)
    port = int(live_namek.base_url.rsplit(":", 1)[1])
    ws = RawWebSocket(
        "127.0.0.1",
        port,
        f"/ws/sandboxes/{screen_sandbox['id']}/screen/",
        {"Authorization": f"Bearer {live_namek.token()}"},
    )
    try:
        assert ws.read_binary(12) == rfb.PROTOCOL_VERSION
        ws.send(rfb.PROTOCOL_VERSION)
        assert ws.read_binary(2) == bytes([1, rfb.SECURITY_NONE])
        ws.send(bytes([rfb.SECURITY_NONE]))
        assert ws.read_binary(4) == bytes(4)
        ws.send(b"\x01")
        opcode, server_init = ws.recv_frame()
        assert opcode == 2 and struct.unpack(">HH", server_init[:4]) == (WIDTH, HEIGHT)
        bytes_per_update = WIDTH * HEIGHT * server_init[4] // 8
        ws.send(set_encodings(ENCODING_RAW))

        # From here on: requests of full, non-incremental Raw updates, and no reading.
        rss_before = daphne.memory_info().rss
        rss_peak = rss_before
        requests = 0
        start = time.monotonic()
        # Stop well before the stall timeout plus the 1 s autobahn waits for the reply to
        # its close frame (after which it drops the connection, buffered data and all).
        while time.monotonic() - start < STALL_SECONDS - 0.5:
            ws.send(update_request(incremental=False))
            requests += 1
            rss_peak = max(rss_peak, daphne.memory_info().rss)
            time.sleep(0.02)
        rss_end_of_requests = daphne.memory_info().rss

        # Now read to the end, without acknowledging anything.
        received = 0
        while True:
            opcode, payload = ws.recv_frame()
            rss_peak = max(rss_peak, daphne.memory_info().rss)
            if opcode == 8:
                break
            assert opcode == 2, (opcode, payload[:100])
            received += len(payload)
        code, reason = struct.unpack(">H", payload[:2])[0], payload[2:].decode()
        with contextlib.suppress(OSError):
            ws.send(payload[:2], opcode=8)
    finally:
        ws.close()
    elapsed = time.monotonic() - start

    mib = 1024 * 1024
    growth = rss_peak - rss_before
    figures = (
        f"{requests} full-screen requests ({requests * bytes_per_update / mib:.0f} MiB if all were buffered) "
        f"in {STALL_SECONDS - 0.5:.1f} s; Daphne RSS before {rss_before / mib:.1f} MiB, "
        f"after the requests {rss_end_of_requests / mib:.1f} MiB, peak {rss_peak / mib:.1f} MiB, "
        f"growth {growth / mib:.1f} MiB; {received} bytes delivered, then close {code} {reason!r} "
        f"after {elapsed:.1f} s"
    )
    print(figures)
    assert requests >= 50, figures
    assert code == Close.TOO_SLOW, figures
    assert reason.startswith(REASONS[Close.TOO_SLOW]), figures
    # The relay stopped reading from the VNC server once the window was full.
    assert RELAY_WINDOW <= received <= RELAY_WINDOW + READ_CHUNK, figures
    assert growth < 64 * mib, figures
    assert growth < requests * bytes_per_update / 4, figures


# --- 5. bad input ------------------------------------------------------------------------


async def _unknown_message_type(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send(bytes([7, 0, 0, 0]))


async def _wrong_version(ws: ClientConnection, client: RelayClient) -> None:
    assert await client.read(12) == rfb.PROTOCOL_VERSION
    await ws.send(b"RFB 003.003\n")


async def _security_type_vncauth(ws: ClientConnection, client: RelayClient) -> None:
    assert await client.read(12) == rfb.PROTOCOL_VERSION
    await ws.send(rfb.PROTOCOL_VERSION)
    assert await client.read(2) == bytes([1, rfb.SECURITY_NONE])
    await ws.send(bytes([rfb.SECURITY_VNC_AUTH]))


async def _malformed_ack(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send('{"type": "ack", "bytes": "all of them"}')


async def _ack_not_json(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send("ack 47")


async def _ack_beyond_what_was_sent(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send(json.dumps({"type": "ack", "bytes": client.received + 1}))


async def _binary_frame_of_2_mib(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send(bytes([rfb.MSG_CLIENT_CUT_TEXT]) + bytes(2 * 1024 * 1024 - 1))


async def _cut_text_announcing_10_mib(ws: ClientConnection, client: RelayClient) -> None:
    await client.handshake()
    await ws.send(struct.pack(">BxxxI", rfb.MSG_CLIENT_CUT_TEXT, 10 * 1024 * 1024) + b"some text")


async def _flood_of_tiny_messages(ws: ClientConnection, client: RelayClient) -> None:
    """20,000 valid messages at once, then silence. The relay's bucket (a burst of 2,000,
    then 1,000 a second) runs dry while Daphne works through them, as long as it handles
    more than ~1,110 a second (a loaded 2-core machine managed 1,200-3,000). Sending
    nothing more afterwards lets the close handshake finish cleanly: a server that closes
    its socket with unread data resets the connection, close frame and all."""
    await client.handshake()
    request = update_request(incremental=True, w=1, h=1)
    for _ in range(20_000):
        await ws.send(request)


@pytest.mark.parametrize(
    ("send_bad_input", "expected"),
    [
        pytest.param(_unknown_message_type, Close.BAD_MESSAGE, id="unknown-client-message-type"),
        pytest.param(_wrong_version, Close.BAD_MESSAGE, id="wrong-rfb-version"),
        pytest.param(_security_type_vncauth, Close.BAD_MESSAGE, id="security-type-other-than-none"),
        pytest.param(_malformed_ack, Close.BAD_MESSAGE, id="ack-with-a-non-number"),
        pytest.param(_ack_not_json, Close.BAD_MESSAGE, id="ack-not-json"),
        pytest.param(_ack_beyond_what_was_sent, Close.BAD_MESSAGE, id="ack-of-more-than-was-sent"),
        pytest.param(_binary_frame_of_2_mib, Close.TOO_BIG, id="binary-frame-of-2-mib"),
        pytest.param(_cut_text_announcing_10_mib, Close.TOO_BIG, id="clipboard-announcing-10-mib"),
        pytest.param(_flood_of_tiny_messages, Close.RATE_LIMITED, id="flood-beyond-the-rate-limit"),
    ],
)
async def test_bad_input_closes_with_a_clear_code_and_the_screen_keeps_working(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any], send_bad_input: Any, expected: Close
) -> None:
    async with open_relay(live_namek, screen_sandbox["id"]) as ws:
        client = RelayClient(ws)
        try:
            await send_bad_input(ws, client)
        except ConnectionClosed:
            pass  # closed while still sending: close_of() reads the close frame
        code, reason = await close_of(ws, timeout=40)
    print(f"closed with {code} {reason!r}")
    assert code == expected, reason
    assert reason.startswith(REASONS[expected]), reason
    await assert_screen_still_served(live_namek, screen_sandbox["id"])


# --- 6. input reaches the sandbox's browser ---------------------------------------------------


def cdp_page_id(socket_path: str, url_part: str = "/sandboxes/start/") -> str:
    """The DevTools target of the page whose URL has ``url_part`` (the start page), from
    ``GET /json/list`` over the UNIX socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "DevTools closed the connection"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        match = re.search(rb"(?i)content-length:\s*(\d+)", head)
        assert match, head
        while len(body) < int(match.group(1)):
            chunk = sock.recv(65536)
            assert chunk, "DevTools closed the connection"
            body += chunk
    pages = [t for t in json.loads(body) if t["type"] == "page" and url_part in t["url"]]
    assert pages, body
    return str(pages[0]["id"])


class Cdp:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def evaluate(self, expression: str) -> Any:
        self.next_id += 1
        await self.ws.send(
            json.dumps(
                {
                    "id": self.next_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            )
        )
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == self.next_id:
                    assert "exceptionDetails" not in message["result"], message
                    return message["result"]["result"].get("value")


RECORD_INPUT = """
window.__clicks = []; window.__keys = [];
document.addEventListener('mousedown', (e) => __clicks.push([e.screenX, e.screenY, e.button]), true);
window.addEventListener('keydown', (e) => __keys.push(e.key), true);
'recording'
"""


async def test_pointer_and_key_events_through_the_relay_reach_the_sandbox_browser(
    live_namek: LiveNamek, screen_sandbox: dict[str, Any]
) -> None:
    socket_path = live_namek.browser_socket(screen_sandbox["id"])
    page_id = await asyncio.to_thread(cdp_page_id, socket_path)
    async with unix_connect(socket_path, f"ws://127.0.0.1/devtools/page/{page_id}", max_size=None) as cdp_ws:
        cdp = Cdp(cdp_ws)
        assert await cdp.evaluate(RECORD_INPUT) == "recording"
        chrome_height = await cdp.evaluate("outerHeight - innerHeight")
        x, y = WIDTH // 2, (HEIGHT + chrome_height) // 2  # the middle of the page area
        # Input reaches the screen only from whoever holds control (test_control_live.py).
        takeover = f"/api/sandboxes/{screen_sandbox['id']}/takeover"
        assert (await asyncio.to_thread(live_namek.api, "POST", takeover))[0] == 200
        async with open_relay(live_namek, screen_sandbox["id"]) as ws:
            client = RelayClient(ws)
            await client.handshake()
            await ws.send(pointer_event(0, x, y))
            await ws.send(pointer_event(1, x, y))  # left button down
            await ws.send(pointer_event(0, x, y))
            await ws.send(key_event(True, ord("q")))
            await ws.send(key_event(False, ord("q")))
            clicks: list[Any] = []
            keys: list[Any] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (clicks and keys):
                clicks, keys = await cdp.evaluate("[__clicks, __keys]")
                await asyncio.sleep(0.1)
    handback = f"/api/sandboxes/{screen_sandbox['id']}/handback"
    assert (await asyncio.to_thread(live_namek.api, "POST", handback))[0] == 200
    assert clicks, "no mousedown reached the page"
    screen_x, screen_y, button = clicks[0]
    assert button == 0
    assert abs(screen_x - x) <= 2 and abs(screen_y - y) <= 2, (clicks, (x, y))
    assert keys == ["q"], keys

"""The parts of the RFB (VNC) protocol Namek speaks itself (RFC 6143).

Namek authenticates to a sandbox's VNC server with the per-sandbox password, so that
the password never leaves the server side; the browser is offered only security type
None. This module has no Django in it: the supervisor uses it for readiness checks and
the screen relay for the upstream handshake.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from Crypto.Cipher import DES

PROTOCOL_VERSION = b"RFB 003.008\n"
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
#: TigerVNC's fixed key for obfuscated password files (vncpasswd -f).
_OBFUSCATION_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])


class RFBError(Exception):
    """The peer broke the protocol or refused us."""


def _reverse_bits(data: bytes) -> bytes:
    return bytes(int(f"{b:08b}"[::-1], 2) for b in data)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """DES of the challenge keyed by the bit-reversed password (RFC 6143 §7.2.2)."""
    key = _reverse_bits(password.encode("latin-1")[:8].ljust(8, b"\0"))
    return DES.new(key, DES.MODE_ECB).encrypt(challenge)


def obfuscate_password(password: str) -> bytes:
    """The 8 bytes ``vncpasswd -f`` writes for ``password`` (Xvnc -PasswordFile)."""
    cipher = DES.new(_reverse_bits(_OBFUSCATION_KEY), DES.MODE_ECB)
    return cipher.encrypt(password.encode("latin-1")[:8].ljust(8, b"\0"))


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    name: str
    raw: bytes


async def _read_reason(reader: asyncio.StreamReader) -> str:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return (await reader.readexactly(min(length, 4096))).decode("utf-8", "replace")


async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str) -> None:
    """Run the client side of the handshake up to a successful SecurityResult."""
    version = await reader.readexactly(12)
    if not version.startswith(b"RFB 003."):
        raise RFBError(f"not an RFB server (said {version!r})")
    writer.write(PROTOCOL_VERSION)
    (count,) = await reader.readexactly(1)
    if count == 0:
        raise RFBError(f"server refused the connection: {await _read_reason(reader)}")
    types = await reader.readexactly(count)
    if SECURITY_VNC_AUTH in types:
        writer.write(bytes([SECURITY_VNC_AUTH]))
        challenge = await reader.readexactly(16)
        writer.write(vnc_auth_response(password, challenge))
    elif SECURITY_NONE in types:
        writer.write(bytes([SECURITY_NONE]))
    else:
        raise RFBError(f"no supported security type among {list(types)}")
    await writer.drain()
    (result,) = struct.unpack(">I", await reader.readexactly(4))
    if result != 0:
        raise RFBError(f"authentication failed: {await _read_reason(reader)}")


async def read_server_init(reader: asyncio.StreamReader) -> ServerInit:
    head = await reader.readexactly(24)
    width, height = struct.unpack(">HH", head[:4])
    (name_length,) = struct.unpack(">I", head[20:24])
    if name_length > 4096:
        raise RFBError("server name too long")
    name = await reader.readexactly(name_length)
    return ServerInit(width, height, name.decode("utf-8", "replace"), head + name)


async def probe(path: str, password: str, timeout: float = 3.0) -> ServerInit:
    """A full handshake with the VNC server on a UNIX socket: the readiness check."""

    async def run() -> ServerInit:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            await authenticate(reader, writer, password)
            writer.write(b"\x01")  # ClientInit, shared
            await writer.drain()
            return await read_server_init(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)


async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str) -> tuple[int, int, bytes]:
    """One full frame from a VNC server: (width, height, pixels as BGRX bytes).

    A client of its own (shared, so nobody is disconnected) asks for 32-bit true colour
    in the Raw encoding, the one encoding every server has, and one full update.
    """
    await authenticate(reader, writer, password)
    writer.write(b"\x01")  # ClientInit, shared
    init = await read_server_init(reader)
    width, height = init.width, init.height
    # SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 255 each, shifts 16/8/0
    writer.write(struct.pack(">BxxxBBBBHHHBBBxxx", MSG_SET_PIXEL_FORMAT, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    writer.write(struct.pack(">BxHi", MSG_SET_ENCODINGS, 1, 0))  # Raw only
    writer.write(struct.pack(">BBHHHH", MSG_FB_UPDATE_REQUEST, 0, 0, 0, width, height))
    await writer.drain()
    frame = bytearray(width * height * 4)
    covered = 0
    while covered < width * height:
        (kind,) = await reader.readexactly(1)
        if kind == 0:  # FramebufferUpdate
            (count,) = struct.unpack(">xH", await reader.readexactly(3))
            for _ in range(count):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
                if encoding != 0 or x + w > width or y + h > height:
                    raise RFBError(f"unexpected rectangle (encoding {encoding}) in a Raw update")
                pixels = await reader.readexactly(w * h * 4)
                for row in range(h):
                    start = ((y + row) * width + x) * 4
                    frame[start : start + w * 4] = pixels[row * w * 4 : (row + 1) * w * 4]
                covered += w * h
        elif kind == 2:  # Bell
            continue
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">xxxi", await reader.readexactly(7))
            await reader.readexactly(abs(length))  # negative: the extended clipboard format
        else:
            raise RFBError(f"unexpected server message {kind} before the frame")
    return width, height, bytes(frame)


# --- the client-to-server message stream ------------------------------------------------

MSG_SET_PIXEL_FORMAT = 0
MSG_SET_ENCODINGS = 2
MSG_FB_UPDATE_REQUEST = 3
MSG_KEY_EVENT = 4
MSG_POINTER_EVENT = 5
MSG_CLIENT_CUT_TEXT = 6
MSG_ENABLE_CONTINUOUS_UPDATES = 150
MSG_CLIENT_FENCE = 248
MSG_XVP = 250
MSG_SET_DESKTOP_SIZE = 251
MSG_QEMU = 255

#: Messages that change what is on the remote screen or clipboard: dropped from viewers
#: who do not hold control (the takeover issue).
INPUT_MESSAGES = frozenset(
    {MSG_KEY_EVENT, MSG_POINTER_EVENT, MSG_CLIENT_CUT_TEXT, MSG_XVP, MSG_SET_DESKTOP_SIZE, MSG_QEMU}
)
ENCODING_EXTENDED_MOUSE_BUTTONS = -316


class ProtocolViolation(Exception):
    """A client message that is not valid RFB."""


class MessageTooBig(ProtocolViolation):
    """A client message above the size limit."""


@dataclass(frozen=True)
class ClientMessage:
    type: int
    data: bytes


class ClientStreamParser:
    """Splits the client-to-server byte stream (after ClientInit) into whole messages.

    Knows every message noVNC 1.7 sends; anything else is a ProtocolViolation, since the
    relay cannot tell where an unknown message ends.
    """

    def __init__(self, max_cut_text: int) -> None:
        self._buffer = bytearray()
        self._max_cut_text = max_cut_text
        self._extended_mouse = False

    def feed(self, data: bytes) -> list[ClientMessage]:
        self._buffer += data
        messages = []
        while self._buffer:
            length = self._message_length()
            if length is None or len(self._buffer) < length:
                break
            chunk = bytes(self._buffer[:length])
            del self._buffer[:length]
            if chunk[0] == MSG_SET_ENCODINGS:
                encodings = struct.unpack(f">{(length - 4) // 4}i", chunk[4:])
                self._extended_mouse = ENCODING_EXTENDED_MOUSE_BUTTONS in encodings
            messages.append(ClientMessage(chunk[0], chunk))
        return messages

    def _need(self, count: int) -> bytes | None:
        return bytes(self._buffer[:count]) if len(self._buffer) >= count else None

    def _message_length(self) -> int | None:  # noqa: PLR0911, PLR0912 - one branch per message type
        kind = self._buffer[0]
        if kind == MSG_SET_PIXEL_FORMAT:
            return 20
        if kind == MSG_SET_ENCODINGS:
            head = self._need(4)
            if head is None:
                return None
            (count,) = struct.unpack(">H", head[2:4])
            return 4 + 4 * count
        if kind in (MSG_FB_UPDATE_REQUEST, MSG_ENABLE_CONTINUOUS_UPDATES):
            return 10
        if kind == MSG_KEY_EVENT:
            return 8
        if kind == MSG_POINTER_EVENT:
            head = self._need(2)
            if head is None:
                return None
            return 7 if self._extended_mouse and head[1] & 0x80 else 6
        if kind == MSG_CLIENT_CUT_TEXT:
            head = self._need(8)
            if head is None:
                return None
            (length,) = struct.unpack(">i", head[4:8])
            size = abs(length)  # negative: the extended clipboard format
            if size > self._max_cut_text:
                raise MessageTooBig(f"clipboard text of {size} bytes exceeds {self._max_cut_text}")
            return 8 + size
        if kind == MSG_CLIENT_FENCE:
            head = self._need(9)
            if head is None:
                return None
            if head[8] > 64:
                raise ProtocolViolation("fence payload longer than 64 bytes")
            return 9 + head[8]
        if kind == MSG_XVP:
            return 4
        if kind == MSG_SET_DESKTOP_SIZE:
            head = self._need(8)
            if head is None:
                return None
            return 8 + 16 * head[6]
        if kind == MSG_QEMU:
            head = self._need(2)
            if head is None:
                return None
            if head[1] != 0:
                raise ProtocolViolation(f"unsupported QEMU message subtype {head[1]}")
            return 12
        raise ProtocolViolation(f"unknown client message type {kind}")

"""The RFB pieces Namek speaks itself, checked against TigerVNC's own tools."""

from __future__ import annotations

import struct
import subprocess

import pytest

from sandboxes import rfb


@pytest.mark.parametrize("password", ["secretpw", "abc", "12345678"])
def test_obfuscated_password_matches_vncpasswd(password: str) -> None:
    expected = subprocess.run(
        ["vncpasswd", "-f"], input=password.encode() + b"\n", capture_output=True, check=True
    ).stdout
    assert rfb.obfuscate_password(password) == expected


def test_parser_splits_a_stream_of_novnc_messages_at_any_boundary() -> None:
    stream = b"".join(
        [
            bytes([0]) + bytes(19),  # SetPixelFormat
            struct.pack(">BxHii", 2, 2, 7, -223),  # SetEncodings
            struct.pack(">BBHHHH", 3, 1, 0, 0, 1280, 800),  # FramebufferUpdateRequest
            struct.pack(">BBxxI", 4, 1, 0x61),  # KeyEvent
            struct.pack(">BBHH", 5, 1, 10, 20),  # PointerEvent
            struct.pack(">BxxxI", 6, 5) + b"hello",  # ClientCutText
            struct.pack(">BxxxIB", 248, 0, 2) + b"ab",  # ClientFence
            struct.pack(">BBHHHH", 150, 1, 0, 0, 10, 10),  # EnableContinuousUpdates
            struct.pack(">BBHI", 255, 0, 1, 0x61) + struct.pack(">I", 30),  # QEMU key
        ]
    )
    for step in (1, 3, 7, len(stream)):
        parser = rfb.ClientStreamParser(max_cut_text=1024)
        kinds = []
        for start in range(0, len(stream), step):
            kinds += [m.type for m in parser.feed(stream[start : start + step])]
        assert kinds == [0, 2, 3, 4, 5, 6, 248, 150, 255]


def test_extended_pointer_events_only_after_the_client_asked_for_them() -> None:
    parser = rfb.ClientStreamParser(max_cut_text=1024)
    assert len(parser.feed(struct.pack(">BBHH", 5, 0x80, 1, 1) + b"\x04")) == 1  # 6 bytes + a KeyEvent start
    parser = rfb.ClientStreamParser(max_cut_text=1024)
    parser.feed(struct.pack(">BxHi", 2, 1, rfb.ENCODING_EXTENDED_MOUSE_BUTTONS))
    messages = parser.feed(struct.pack(">BBHHB", 5, 0x80, 1, 1, 1))
    assert [len(m.data) for m in messages] == [7]


def test_parser_refuses_unknown_and_oversized_messages() -> None:
    with pytest.raises(rfb.ProtocolViolation, match="unknown client message type 99"):
        rfb.ClientStreamParser(1024).feed(bytes([99, 0, 0]))
    with pytest.raises(rfb.MessageTooBig):
        rfb.ClientStreamParser(1024).feed(struct.pack(">BxxxI", 6, 4096))
    with pytest.raises(rfb.MessageTooBig):  # the extended clipboard's negative length counts too
        rfb.ClientStreamParser(1024).feed(struct.pack(">Bxxxi", 6, -4096))
    with pytest.raises(rfb.ProtocolViolation, match="fence"):
        rfb.ClientStreamParser(1024).feed(struct.pack(">BxxxIB", 248, 0, 200))


def test_input_messages_are_the_ones_that_change_the_screen() -> None:
    assert {rfb.MSG_KEY_EVENT, rfb.MSG_POINTER_EVENT, rfb.MSG_CLIENT_CUT_TEXT} <= rfb.INPUT_MESSAGES
    assert rfb.MSG_FB_UPDATE_REQUEST not in rfb.INPUT_MESSAGES
    assert rfb.MSG_SET_ENCODINGS not in rfb.INPUT_MESSAGES

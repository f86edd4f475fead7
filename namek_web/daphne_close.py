"""Lets Daphne send the close frames our close-code table needs.

Daphne 4.2 drops the ``reason`` of an ASGI ``websocket.close`` message, and autobahn's
``sendClose`` refuses 1011 from a server (it only allows 1000 and 3000-4999), although
RFC 6455 §7.4.1 defines 1011 as exactly that: the server could not go on. Pages show the
reason and tell 1011 (retry) from 44xx (give up), so both must reach the browser.
This wraps Daphne's reply handler to send the close frame itself for an open socket.
"""

from __future__ import annotations

from typing import Any

ALLOWED = (1000, 1011)


def install() -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not under Daphne
        return
    if getattr(WebSocketProtocol, "_namek_close_patch", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.close" and self.state == self.STATE_OPEN:
            code = message.get("code") or 1000
            if code in ALLOWED or 3000 <= code <= 4999:
                reason = (message.get("reason") or "").encode()[:123] or None
                self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)
                return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._namek_close_patch = True

"""How Namek runs Daphne: one command line for `make run` and the tests alike."""

from __future__ import annotations

import sys

#: Incoming websocket message and frame limit. Above the screen relay's own limit
#: (viewer.screen_relay.MAX_BROWSER_FRAME), so that the relay, not autobahn, refuses a
#: big frame and the browser gets 4413 instead of a dropped connection. Autobahn applies
#: it to what we send, too: the relay's frames stay below it.
WEBSOCKET_MAX_BYTES = 4 * 1024 * 1024


def daphne_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "daphne",
        "--bind", host, "--port", str(port),
        # Keepalive: Daphne pings every 20 s and drops a peer silent for 30 s more.
        "--ping-interval", "20", "--ping-timeout", "30",
        "--websocket-max-message-size", str(WEBSOCKET_MAX_BYTES),
        "--websocket-max-frame-size", str(WEBSOCKET_MAX_BYTES),
        "namek_web.asgi:application",
    ]  # fmt: skip

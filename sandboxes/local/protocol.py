"""The supervisor's wire protocol: JSON objects, one a line, over a UNIX socket.

Request:  ``{"op": "create" | "status" | "delete" | "screen" | "browser" | "shell" | "list" | "ping" | "watch", ...}``
Response: ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "retryable": bool}``.

``shell`` answers ``{"ok": true, "path": <the tmux server's socket>, "session": "main"}``.
``watch`` answers ``{"ok": true}`` and then streams ``{"event": "phase", "id", "phase",
"reason"}`` lines until the client goes away. The socket is mode 0600 in the data dir:
only Namek's own processes can talk to the supervisor.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 64 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message

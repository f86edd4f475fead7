"""The close codes of every Namek websocket, in one table.

A consumer always accepts first and then closes with one of these (Daphne turns a
refusal before accept into an HTTP 403, which a browser only sees as 1006). Pages stop
reconnecting on any 44xx code and show its reason.
"""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    NORMAL = 1000
    UNREACHABLE = 1011
    BAD_MESSAGE = 4400
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    NOT_FOUND = 4404
    TOO_SLOW = 4408
    TOO_BIG = 4413
    RATE_LIMITED = 4429


REASONS: dict[Close, str] = {
    Close.NORMAL: "closed",
    Close.UNREACHABLE: "the sandbox cannot be reached",
    Close.BAD_MESSAGE: "bad message",
    Close.UNAUTHENTICATED: "not logged in",
    Close.FORBIDDEN: "not allowed",
    Close.NOT_FOUND: "no such sandbox",
    Close.TOO_SLOW: "the connection fell too far behind",
    Close.TOO_BIG: "message too big",
    Close.RATE_LIMITED: "too many messages",
}


def reason(code: Close, detail: str = "") -> str:
    """The close reason: the table's text, then a detail. Close frames allow 123 bytes."""
    text = REASONS[code] + (f": {detail}" if detail else "")
    return text.encode()[:123].decode(errors="ignore")

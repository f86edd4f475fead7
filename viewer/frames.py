"""Checks shared by the websockets that take JSON frames (terminal, agent bridge, CDP)."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """A JSON integer (``True`` is an int to Python, not to a protocol)."""
    return isinstance(value, int) and not isinstance(value, bool)

"""Typed helpers that read settings from the environment and fail loudly.

Every helper raises ``ImproperlyConfigured`` naming the variable, so a bad value stops
Namek at start with a message that says what to fix.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def env_int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected a whole number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value}: must be at most {maximum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r}: must be a number of at least {minimum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


_BIND_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def parse_bind(name: str, value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) → (host, port)."""
    match = _BIND_RE.match(value)
    port = int(match.group("port")) if match else 0
    if not match or not 1 <= port <= 65535:
        raise ImproperlyConfigured(f"{name}={value!r}: expected host:port, e.g. 127.0.0.1:8000")
    return match.group("host").strip("[]"), port


_SIZE_RE = re.compile(r"(\d{3,4})x(\d{3,4})", re.ASCII)
SCREEN_MIN = (320, 200)
SCREEN_MAX = (3840, 2160)


def parse_screen_size(value: str) -> tuple[int, int] | None:
    """``WxH`` within SCREEN_MIN..SCREEN_MAX → (w, h); anything else → None."""
    # fullmatch: "$" would let a trailing newline through; re.ASCII: only 0-9 are digits.
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if not (SCREEN_MIN[0] <= width <= SCREEN_MAX[0] and SCREEN_MIN[1] <= height <= SCREEN_MAX[1]):
        return None
    return width, height


def env_screen_size(name: str, default: str) -> str:
    value = os.environ.get(name) or default
    if parse_screen_size(value) is None:
        raise ImproperlyConfigured(
            f"{name}={value!r}: expected WIDTHxHEIGHT between "
            f"{SCREEN_MIN[0]}x{SCREEN_MIN[1]} and {SCREEN_MAX[0]}x{SCREEN_MAX[1]}"
        )
    return value


def env_url(name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ImproperlyConfigured(f"{name}={value!r}: expected a URL starting with {' or '.join(schemes)}://")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: bad port") from None
    return value


def secret_key(name: str, data_dir: Path) -> str:
    """The variable if set, else a key generated once and kept in the data dir."""
    value = os.environ.get(name)
    if value:
        if len(value) < 32:
            raise ImproperlyConfigured(f"{name}: must be at least 32 characters")
        return value
    path = data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(50)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process (the supervisor) won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key

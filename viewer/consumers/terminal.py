"""``/ws/sandboxes/<id>/terminal/``: the sandbox's shell. Translates frames only; the
PTY and its process belong to ``viewer.terminal``.

The wire protocol is terminado's: text frames, each a JSON array ``[kind, ...]``.

Browser to server:

- ``["stdin", text]``: keystrokes (ignored unless this viewer holds the control lease);
- ``["set_size", rows, cols]``: integers from 1 to 1000;
- ``["ack", n]``: the viewer has received ``n`` ``stdout`` messages in all. Namek's
  addition: output pauses while ``window`` messages are unacknowledged, so that a slow
  browser makes tmux wait instead of Daphne buffering without bound.

Server to browser:

- ``["setup", {"readonly": bool, "sandbox": id, "window": n}]`` first, and again
  whenever the viewer gains or loses control (its tmux client is re-attached in the
  other mode; output counts go on);
- ``["stdout", text]``;
- ``["disconnect", code]`` just before the server closes with that code.

Bad input closes the socket: binary frames, malformed JSON, unknown kinds, wrong
arguments, absurd sizes and bad acknowledgements with 4400, frames over 64 KiB with 4413,
more input than the shell takes with 4429. A sandbox that is not ready, or whose shell
cannot be attached, closes with 1011 (the page retries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.db import database_sync_to_async

from sandboxes import events
from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer
from viewer.consumers.control import ControlFollower
from viewer.frames import is_int
from viewer.terminal import WINDOW, Terminal, TerminalError, TooMuchInput

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024


class TerminalConsumer(ControlFollower, NamekConsumer):
    frames_skip_database = True
    terminal: Terminal | None = None
    readonly = True
    attached_at = 0.0
    #: serialises re-attaching as control changes
    _switching: asyncio.Lock | None = None

    async def opened(self) -> None:
        assert self.sandbox is not None
        self._switching = asyncio.Lock()
        await self.follow_control()
        async with self._switching:
            self.readonly = not self.drives
            terminal = await self.attach()
            if terminal is None:
                return
            self.terminal = terminal
        self.attached_at = time.monotonic()
        await self.lease_applied()  # control may have changed while attaching
        await self.record("terminal.opened", "Terminal opened" + (" (read-only)" if self.readonly else ""))

    async def attach(self, previous: Terminal | None = None) -> Terminal | None:
        """Start a tmux client in this viewer's mode (after ``setup``); None if closed."""
        assert self.sandbox is not None
        argv = await self.ask_backend("open_shell", readonly=self.readonly)
        if argv is None:
            return None
        rows, cols = (previous.rows, previous.cols) if previous else (24, 80)
        terminal = Terminal(argv, self.send_stdout, self.shell_ended, rows=rows, cols=cols)
        if previous is not None:
            terminal.sent, terminal.acked = previous.sent, previous.acked
        # setup goes first: once started, the terminal sends output whenever it has some.
        await self.send_message(["setup", {"readonly": self.readonly, "sandbox": self.sandbox.pk, "window": WINDOW}])
        try:
            terminal.start()
        except OSError as exc:
            log.warning("sandbox %s: cannot attach a terminal: %s", self.sandbox.pk, exc)
            await self.close_with(Close.UNREACHABLE, "the shell cannot be attached")
            return None
        return terminal

    async def lease_applied(self) -> None:
        """Gained or lost control: re-attach in the other mode, on the same socket."""
        if self._switching is None or self.terminal is None or self.readonly != self.drives:
            return
        async with self._switching:
            if self.closing or self.terminal is None or self.readonly != self.drives:
                return
            previous = self.terminal
            self.readonly = not self.drives
            await previous.close()
            self.terminal = await self.attach(previous)

    async def record(self, kind: str, text: str, **data: Any) -> None:
        assert self.sandbox is not None
        actor = self.who()
        data = {"readonly": self.readonly, **data}
        try:
            await database_sync_to_async(events.record)(self.sandbox.pk, kind, text, data=data, actor=actor)
        except Exception:  # the log is not worth a shell: the viewer keeps (or ends) its session
            log.exception("sandbox %s: could not log %s", self.sandbox.pk, kind)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.terminal is None or self.closing:
            return
        if text_data is None:
            await self.close_with(Close.BAD_MESSAGE, "binary frames are not accepted")
            return
        if len(text_data) > MAX_MESSAGE or len(text_data.encode()) > MAX_MESSAGE:
            await self.close_with(Close.TOO_BIG, f"over {MAX_MESSAGE} bytes")
            return
        try:
            self.handle(json.loads(text_data))
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            await self.close_with(Close.BAD_MESSAGE, str(exc))
        except TooMuchInput as exc:
            await self.close_with(Close.RATE_LIMITED, str(exc))
        except TerminalError as exc:
            await self.close_with(Close.BAD_MESSAGE, str(exc))

    def handle(self, message: Any) -> None:
        assert self.terminal is not None
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            raise ValueError("expected a JSON array [kind, ...]")
        kind, args = message[0], message[1:]
        if kind == "stdin" and len(args) == 1 and isinstance(args[0], str):
            if not self.readonly and self.drives:
                self.terminal.write(args[0])
                self.count("terminal")
        elif kind == "set_size" and len(args) == 2 and all(is_int(a) for a in args):
            self.terminal.resize(args[0], args[1])
        elif kind == "ack" and len(args) == 1 and is_int(args[0]):
            self.terminal.ack(args[0])
        elif kind in ("stdin", "set_size", "ack"):
            raise ValueError(f"bad arguments for {kind}")
        else:
            raise ValueError(f"unknown message kind {kind[:40]!r}")

    async def send_message(self, message: list[Any]) -> None:
        if not self.closing:
            await self.send(text_data=json.dumps(message))

    async def send_stdout(self, text: str) -> None:
        await self.send_message(["stdout", text])

    async def shell_ended(self) -> None:
        # The tmux client ended: its server went (the sandbox stops, or it restarts the
        # server). Not final: the page reconnects.
        await self.close_with(Close.UNREACHABLE, "the shell ended")

    async def close_with(self, code: Close, detail: str = "") -> None:
        if not self.closing:
            await self.send_message(["disconnect", int(code)])
        await super().close_with(code, detail)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        await self.stop_following()
        if self.terminal is not None:
            await self.terminal.close()
            seconds = round(time.monotonic() - self.attached_at, 1)
            await self.record("terminal.closed", f"Terminal closed after {seconds} s", seconds=seconds, code=code)

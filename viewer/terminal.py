"""The PTY behind a terminal websocket: one tmux client per viewer, owned here.

The shell itself lives in the sandbox (a tmux server, see ``SandboxBackend.open_shell``);
each viewer's connection runs the attach command the backend gives in a PTY of its own.
So every viewer sees the same shell, a newcomer gets tmux's redraw, and any web process
can serve any viewer.

This module owns that process's whole life: spawn (a new session, so that teardown can
signal its group), nonblocking reads through the event loop, resizes, and teardown with
SIGHUP, then SIGTERM, then SIGKILL. Output is bounded: the viewer acknowledges the
``stdout`` messages it has received, and once ``window`` of them are unacknowledged this
stops reading the PTY, so tmux (which copes with slow terminals by redrawing later) waits
instead of Daphne buffering without bound. Input is bounded too (``MAX_PENDING_INPUT``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: bytes read from the PTY at a time: one ``stdout`` message at most
READ_CHUNK = 16 * 1024
#: unacknowledged ``stdout`` messages after which reading pauses (32 x 16 KiB = 512 KiB)
WINDOW = 32
#: bytes of input the PTY has not taken yet, past which ``write`` refuses more
MAX_PENDING_INPUT = 1024 * 1024
MAX_SIZE = 1000
#: how long each teardown signal gets before the next, stronger one
SIGNAL_GRACE = 1.0
#: the tmux client's environment: nothing of the web process's leaks into the sandbox
ENVIRONMENT = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"}


class TerminalError(Exception):
    """A viewer broke the rules (a bad size or acknowledgement)."""


class TooMuchInput(TerminalError):
    """More keystrokes pending than the PTY has taken (``MAX_PENDING_INPUT``)."""


class Terminal:
    """One attach command in one PTY. ``start`` it, then ``write``, ``resize``, ``ack``;
    ``close`` always, also after ``on_exit`` (which reports the command's end)."""

    def __init__(
        self,
        argv: list[str],
        on_output: Callable[[str], Awaitable[None]],
        on_exit: Callable[[], Awaitable[None]],
        *,
        rows: int = 24,
        cols: int = 80,
        window: int = WINDOW,
    ) -> None:
        self.argv = argv
        self.on_output = on_output
        self.on_exit = on_exit
        self.rows, self.cols = rows, cols
        self.window = window
        self.process: subprocess.Popen[bytes] | None = None
        self.fd = -1
        self.sent = 0  # stdout messages produced
        self.acked = 0
        self.reading = False
        self.ended = False
        self.closed = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._outbox: deque[str] = deque()
        self._wake = asyncio.Event()
        self._input = bytearray()
        self._writing = False
        self._sender: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the command in a new PTY. Raises OSError if it cannot run."""
        master, slave = os.openpty()
        try:
            _set_size(master, self.rows, self.cols)
            self.process = subprocess.Popen(
                self.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=ENVIRONMENT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.fd = master
        os.set_blocking(master, False)
        self._sender = asyncio.ensure_future(self._send_loop())
        self._resume()

    async def close(self) -> None:
        """Stop reading, end the process (SIGHUP, SIGTERM, SIGKILL) and reap it."""
        if self.closed:
            return
        self.closed = True
        self._pause()
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        if self._sender is not None and self._sender is not asyncio.current_task():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        process = self.process
        if process is not None:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
                if process.poll() is not None:
                    break
                # The group: whatever the attach command started goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)
                await _wait_exit(process, SIGNAL_GRACE)
            if process.poll() is None:
                log.warning("terminal process %s survived SIGKILL", process.pid)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- the viewer's side ------------------------------------------------------------------

    def write(self, text: str) -> None:
        """Queue keystrokes for the PTY. Raises TooMuchInput if too much is pending."""
        if self.closed or self.ended:
            return
        data = text.encode()
        if len(self._input) + len(data) > MAX_PENDING_INPUT:
            raise TooMuchInput("too much input pending")
        self._input += data
        self._flush_input()

    def resize(self, rows: int, cols: int) -> None:
        if not (1 <= rows <= MAX_SIZE and 1 <= cols <= MAX_SIZE):
            raise TerminalError(f"bad size {rows}x{cols}")
        self.rows, self.cols = rows, cols
        if self.closed or self.process is None:
            return
        _set_size(self.fd, rows, cols)
        # The client is not the PTY's controlling process (it leads a session of its own
        # without one), so the kernel would not tell it: we do.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGWINCH)

    def ack(self, count: int) -> None:
        """The viewer has received ``count`` stdout messages in all."""
        if not (self.acked <= count <= self.sent):
            raise TerminalError(f"acknowledged {count} of {self.sent} messages (after {self.acked})")
        self.acked = count
        if not self.reading and self.sent - self.acked < self.window:
            self._resume()

    # --- the PTY's side ---------------------------------------------------------------------

    def _resume(self) -> None:
        if not self.reading and not self.closed and not self.ended:
            self._loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _pause(self) -> None:
        if self.reading:
            self._loop.remove_reader(self.fd)
            self.reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: every process holding the PTY's other end is gone
            data = b""
        if not data:
            self._pause()
            self.ended = True
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._queue(tail)
            self._wake.set()
            return
        text = self._decoder.decode(data)
        if text:
            self._queue(text)

    def _queue(self, text: str) -> None:
        self._outbox.append(text)
        self.sent += 1
        if self.sent - self.acked >= self.window:
            self._pause()
        self._wake.set()

    async def _send_loop(self) -> None:
        """Hands output to the viewer in order; reports the end once all is handed over."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                await self.on_output(self._outbox.popleft())
            if self.ended:
                await self.on_exit()
                return

    def _flush_input(self) -> None:
        while self._input:
            try:
                written = os.write(self.fd, self._input)
            except BlockingIOError:
                break
            except OSError:
                self._input.clear()
                break
            del self._input[:written]
        if self._input and not self._writing:
            self._loop.add_writer(self.fd, self._flush_input)
            self._writing = True
        elif not self._input and self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Reap the process within ``timeout`` seconds, without blocking the event loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while process.poll() is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)

"""Terminal echo round trip: Namek's terminal websocket against a direct tmux attach.

Run with ``.venv/bin/python -m tests.benchmarks.terminal_bench`` (``make bench``).

What it does, in one run:

1. starts a real Namek (``tests.live.LiveNamek``: supervisor + Daphne, no warm pool) in a
   temporary directory and creates one sandbox;
2. opens three terminals, each 24x80, each at a shell prompt set to ``$ `` (no letters):

   * ``namek``: ``/ws/sandboxes/<id>/terminal/`` through Daphne with a bearer token;
     ``["stdin", c]`` out, ``["stdout", text]`` in, every ``stdout`` acknowledged on
     arrival (``["ack", n]``) as the protocol wants;
   * ``direct tmux attach``, **the baseline**: the argv ``LocalBackend.open_shell(id,
     readonly=False)`` gives (what Namek's PTY manager runs for each viewer), run with the
     same environment in a PTY this benchmark opens and reads itself;
   * ``direct bash PTY``: ``bash --norc --noprofile`` in a local PTY (no tmux, no sandbox),
     for reference;

3. per round (``--rounds``, after ``--warmup`` rounds not counted), in an order rotated per
   round so that drift on this busy machine hits all paths alike, each path types one
   lowercase letter; the clock runs from just before the keystroke is written (websocket
   frame sent, or ``write`` on the PTY's master) until its echo has been read: the letter
   among the characters the terminal shows. Output is parsed as a VT stream (escape
   sequences skipped), so the ``h`` of ``ESC[?25h`` does not count. ``namek`` and the
   baseline type into the same shell and so see each other's echoes: each uses its own
   half of the alphabet and forgets what arrived before it types. Every 12 rounds each
   line is cleared with Ctrl-U (no letter repeats on a line, none wraps) and the terminals
   are left to go quiet; that is not timed.

The table shows p50, p90, p99 and the mean in milliseconds, and the ratios of p50 and p99
to the baseline's in the same run. Results (every sample too) are written as JSON
(``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import fcntl
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.benchmarks import cli
from tests.live import LiveNamek

NAMEK = "namek"
BASELINE = "direct tmux attach"
BASH = "direct bash PTY"
PATHS = (NAMEK, BASELINE, BASH)
#: the letters each path types; the two that share the sandbox's shell use disjoint halves
LETTERS = {NAMEK: "abcdefghijklm", BASELINE: "nopqrstuvwxyz", BASH: "abcdefghijklm"}
CLEAR_EVERY = 12
ROWS, COLS = 24, 80
ECHO_TIMEOUT = 10.0
SET_PROMPT = "PS1='$ '; echo READY$((6*7))\r"
READY = "READY42"
#: what follows ESC to open a sequence that runs to a terminator (CSI, OSC, DCS, SOS, PM, APC)
INTRODUCERS = {"[": "csi", "]": "osc", "P": "string", "X": "string", "^": "string", "_": "string"}


class Screen:
    """The characters a terminal would show from a stream of output: a small VT parser
    that skips escape sequences (CSI, OSC, DCS and the like) and control characters."""

    def __init__(self) -> None:
        self.state = "ground"
        self.visible = ""  # what was shown since the last forget()

    def forget(self) -> None:
        self.visible = ""

    def feed(self, text: str) -> None:
        shown = []
        for char in text:
            if self.state == "ground":
                if char == "\x1b":
                    self.state = "escape"
                elif char.isprintable():  # not C0, DEL or C1 controls
                    shown.append(char)
            else:
                self.state = self._next_state(self.state, char, ord(char))
        self.visible += "".join(shown)

    @staticmethod
    def _next_state(state: str, char: str, code: int) -> str:
        """Where a character inside an escape sequence leads."""
        if state == "escape":  # ESC ( B and the like: intermediates, then one final byte
            return INTRODUCERS.get(char) or ("intermediate" if 0x20 <= code <= 0x2F else "ground")
        if state == "intermediate":
            return state if 0x20 <= code <= 0x2F else "ground"
        if state == "csi":  # parameters and intermediates up to a final byte; ESC aborts
            return "escape" if char == "\x1b" else "ground" if 0x40 <= code <= 0x7E else state
        if state in ("osc", "string"):  # up to ST (ESC \\), or BEL after an OSC
            if char == "\x1b":
                return state + "-escape"
            return "ground" if char == "\x07" and state == "osc" else state
        return "ground" if char == "\\" else state.removesuffix("-escape")


class EchoPath:
    """One way of typing into a shell; subclasses read its output in the background."""

    name = ""

    def __init__(self) -> None:
        self.screen = Screen()
        self.arrived = asyncio.Event()
        self.last_output = time.monotonic()
        self.ended = False
        self.tail = ""  # the last output, for error messages

    def _output(self, text: str) -> None:
        self.screen.feed(text)
        self.tail = (self.tail + text)[-300:]
        self.last_output = time.monotonic()
        self.arrived.set()

    async def send(self, text: str) -> None:
        raise NotImplementedError

    async def wait_shown(self, text: str, timeout: float = ECHO_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen.visible:
            if self.ended:
                raise RuntimeError(f"{self.name}: the terminal ended; its last output was {self.tail!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: {text!r} was not echoed within {timeout:g} s; last {self.tail!r}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    async def round_trip(self, char: str) -> float:
        """Milliseconds from writing ``char`` to reading its echo."""
        self.screen.forget()
        started = time.perf_counter()
        await self.send(char)
        await self.wait_shown(char)
        return (time.perf_counter() - started) * 1000


class WebsocketPath(EchoPath):
    """Namek's terminal websocket: a reader task acknowledges every ``stdout`` on arrival."""

    name = NAMEK

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__()
        self.ws = ws
        self.received = 0
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                kind, *args = json.loads(raw)
                if kind == "stdout":
                    self.received += 1
                    self._output(args[0])
                    await self.ws.send(json.dumps(["ack", self.received]))
                elif kind == "disconnect":
                    self.tail += f" [disconnect {args[0]}]"
        except ConnectionClosed:
            pass
        finally:
            self.ended = True
            self.arrived.set()

    async def send(self, text: str) -> None:
        await self.ws.send(json.dumps(["stdin", text]))

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await self.reader


class PtyPath(EchoPath):
    """A command in a PTY of our own, read through the event loop.

    ``controlling_tty``: the PTY becomes the command's controlling terminal (a shell wants
    one for job control); without, the command runs as Namek's PTY manager runs the tmux
    client: a session of its own without a controlling terminal.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, *, controlling_tty: bool) -> None:
        super().__init__()
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.returncode: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._loop: asyncio.AbstractEventLoop | None = None
        master, slave = os.openpty()
        self.fd = master
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
            if controlling_tty:
                self.pid = _spawn_with_tty(argv, env, cwd, master, slave)
            else:
                self.process = subprocess.Popen(
                    argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
                )
                self.pid = self.process.pid
        except BaseException:
            os.close(master)
            self.fd = -1
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)

    def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def detach(self) -> None:
        if self._loop is not None and self.fd >= 0 and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self._loop = None

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the command and everything it started are gone
            data = b""
        if not data:
            self.detach()
            self.ended = True
            self.arrived.set()
            return
        self._output(self._decoder.decode(data))

    async def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exited(self) -> bool:
        if self.process is not None:
            return self.process.poll() is not None
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode is not None

    def stop(self) -> None:
        """End the command's process group (SIGHUP, SIGTERM, SIGKILL), reap it, close the PTY."""
        self.detach()
        if self.pid:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
                if self.exited():
                    break
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)
                deadline = time.monotonic() + 1.0
                while not self.exited() and time.monotonic() < deadline:
                    time.sleep(0.02)
            if not self.exited():
                print(f"{self.name}: process {self.pid} survived SIGKILL", file=sys.stderr, flush=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _spawn_with_tty(argv: list[str], env: dict[str, str], cwd: Path, master: int, slave: int) -> int:
    """fork, then in the child: a new session whose controlling terminal is ``slave``, exec."""
    pid = os.fork()
    if pid == 0:  # the child: nothing but system calls until exec
        try:
            os.close(master)
            os.login_tty(slave)
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


async def settle(paths: list[EchoPath], quiet: float = 0.15, timeout: float = 10.0) -> None:
    """Wait until no path has had output for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = max(path.last_output for path in paths)
        if time.monotonic() - last >= quiet:
            return
        await asyncio.sleep(quiet / 3)
    raise RuntimeError(f"the terminals did not go quiet within {timeout:g} s")


# --- the measurement ----------------------------------------------------------------------


async def measure_rounds(
    namek: LiveNamek,
    sandbox_id: int,
    shell_argv: list[str],
    base: Path,
    args: argparse.Namespace,
    *,
    on_pty: Callable[[PtyPath], None],
) -> dict[str, list[float]]:
    from viewer.terminal import ENVIRONMENT

    url = f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/terminal/"
    headers = {"Authorization": f"Bearer {namek.token()}"}
    async with connect(url, additional_headers=headers, open_timeout=10, max_size=None) as ws:
        kind, setup = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if kind != "setup" or setup.get("readonly") is not False:
            raise RuntimeError(f"the terminal socket answered {kind} {setup}")
        web = WebsocketPath(ws)
        pty_paths: list[PtyPath] = []
        try:
            await web.send("\x15")  # an empty line, whatever the shell held
            await ws.send(json.dumps(["set_size", ROWS, COLS]))
            tmux = PtyPath(BASELINE, shell_argv, dict(ENVIRONMENT), base, controlling_tty=False)
            on_pty(tmux)
            pty_paths.append(tmux)
            home = base / "bash-home"
            home.mkdir(exist_ok=True)
            bash_env = {**ENVIRONMENT, "HOME": str(home), "PS1": "$ ", "HISTFILE": str(home / "history")}
            bash = PtyPath(
                BASH,
                [shutil.which("bash") or "/bin/bash", "--norc", "--noprofile"],
                bash_env,
                home,
                controlling_tty=True,
            )
            on_pty(bash)
            pty_paths.append(bash)
            for path in pty_paths:
                path.attach()
            paths: dict[str, EchoPath] = {NAMEK: web, BASELINE: tmux, BASH: bash}
            # A prompt without letters in the sandbox's shell (both see it) and in bash.
            for path in (web, bash):
                await path.send(SET_PROMPT)
                await path.wait_shown(READY, timeout=30)
            await tmux.wait_shown(READY, timeout=30)
            await settle(list(paths.values()))

            samples: dict[str, list[float]] = {name: [] for name in PATHS}
            total = args.warmup + args.rounds
            for number in range(total):
                if number and number % CLEAR_EVERY == 0:
                    await web.send("\x15")
                    await bash.send("\x15")
                    await settle(list(paths.values()))
                shift = number % len(PATHS)
                for name in PATHS[shift:] + PATHS[:shift]:
                    letters = LETTERS[name]
                    took = await paths[name].round_trip(letters[number % len(letters)])
                    if number >= args.warmup:
                        samples[name].append(took)
                if (number + 1) % 50 == 0:
                    print(f"round {number + 1}/{total}", file=sys.stderr, flush=True)
            await web.send("\x15")
            await bash.send("\x15")
            return samples
        finally:
            for path in pty_paths:
                path.detach()
            await web.close()


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def summarise(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    summary = {
        name: {
            "p50_ms": percentile(values, 50),
            "p90_ms": percentile(values, 90),
            "p99_ms": percentile(values, 99),
            "mean_ms": statistics.fmean(values),
            "min_ms": min(values),
            "max_ms": max(values),
        }
        for name, values in samples.items()
    }
    base = summary[BASELINE]
    for row in summary.values():
        row["p50_ratio"] = row["p50_ms"] / base["p50_ms"]
        row["p99_ratio"] = row["p99_ms"] / base["p99_ms"]
    return summary


def version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
        return output.splitlines()[0].strip() if output else "unknown"
    return "unknown"


def run_benchmark(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Set everything up, measure, and tear everything down again (also on errors and Ctrl-C)."""
    from sandboxes.backends.local import LocalBackend

    namek = LiveNamek(base, NAMEK_WARM_POOL="0")
    sandbox_id: int | None = None
    ptys: list[PtyPath] = []
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        print(f"starting Namek in {base} ...", file=sys.stderr, flush=True)
        namek.start()
        sandbox_id = int(namek.create_sandbox(name="terminal-bench")["id"])
        # Keystrokes reach the shell only from the person holding control.
        status, body = namek.api("POST", f"/api/sandboxes/{sandbox_id}/takeover")
        assert status == 200, body
        shell_argv = LocalBackend(str(namek.data_dir / "supervisor.sock")).open_shell(sandbox_id, readonly=False)
        samples = asyncio.run(measure_rounds(namek, sandbox_id, shell_argv, base, args, on_pty=ptys.append))
        load_after = os.getloadavg()[0]
    finally:
        for pty in ptys:
            pty.stop()
        if sandbox_id is not None:
            cli.delete_sandbox(namek, sandbox_id)
        namek.stop()
    return {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "baseline": BASELINE,
        "shell_argv": shell_argv,
        "size": [ROWS, COLS],
        "tmux": version(["tmux", "-V"]),
        "bash": version(["bash", "--version"]),
        "load_average": [load_before, load_after],
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
        "summary": summarise(samples),
        "samples_ms": samples,
    }


def report(result: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        f"Terminal echo round trip: one keystroke written -> its echo read, {result['rounds']} interleaved rounds "
        f"(after {result['warmup']} not counted), ms. Baseline: {BASELINE} (the argv LocalBackend.open_shell gives, "
        "in a PTY of the benchmark's own) on the same sandbox's shell in the same run. "
        f"Load average (1 min) {load[0]:.1f} -> {load[1]:.1f} on {result['cpus']} CPUs; {result['tmux']}.",
        "",
        "| path | p50 ms | p90 ms | p99 ms | mean ms | p50 / baseline | p99 / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PATHS:
        row = result["summary"][name]
        label = f"{name} (baseline)" if name == BASELINE else name
        lines.append(
            f"| {label} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} "
            f"| {row['p50_ratio']:.2f} | {row['p99_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds, one keystroke per path each (300)")
    parser.add_argument("--warmup", type=int, default=20, help="rounds before those, not counted (20)")
    parser.add_argument("--json", default="bench-results/terminal.json", help="where to save the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup not negative")

    return cli.run(args, "namek-terminal-bench-", run_benchmark, report)


if __name__ == "__main__":
    sys.exit(main())

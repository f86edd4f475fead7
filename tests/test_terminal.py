"""The terminal: a real tmux server and bash in a real sandbox, reached through Daphne
with websockets from outside, and the PTY manager (``viewer.terminal``) on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sandboxes.backends.local import LocalBackend
from tests.live import LiveNamek, ready_sandbox
from viewer.consumers.terminal import TerminalConsumer
from viewer.terminal import MAX_PENDING_INPUT, Terminal

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def shell_box(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    """One sandbox for the module: every test leaves the shell usable for the next."""
    with ready_sandbox(live_namek, name="terminal") as created:
        # The owner drives for the whole module: keystrokes reach the shell only from the
        # holder of the control lease (test_control_live.py checks the others are ignored).
        assert live_namek.api("POST", f"/api/sandboxes/{created['id']}/takeover")[0] == 200
        yield created


class Viewer:
    """A websocket client of the terminal that acknowledges what it reads (unless
    ``acking`` is off) and keeps everything it was sent as one string."""

    def __init__(self, ws: ClientConnection, setup: dict[str, Any]) -> None:
        self.ws = ws
        self.setup = setup
        self.output = ""
        self.received = 0
        self.acking = True

    async def send(self, *message: Any) -> None:
        await self.ws.send(json.dumps(list(message)))

    async def type(self, line: str) -> None:
        await self.send("stdin", line + "\r")

    async def read_once(self, timeout: float) -> None:
        kind, *args = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if kind == "stdout":
            self.output += args[0]
            self.received += 1
            if self.acking:
                await self.send("ack", self.received)

    async def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never came; the tail was {self.output[-500:]!r}"
            await self.read_once(left)


def url(namek: LiveNamek, sandbox_id: int, ws_base: str | None = None) -> str:
    """The terminal socket, on ``namek``'s Daphne or on another one (``ws_base``)."""
    return f"{ws_base or namek.ws_base}/ws/sandboxes/{sandbox_id}/terminal/"


def auth(namek: LiveNamek, who: str = "owner") -> dict[str, str]:
    return {"Authorization": f"Bearer {namek.token(who)}"}


async def open_viewer(namek: LiveNamek, sandbox_id: int, ws_base: str | None = None) -> Viewer:
    ws = await connect(url(namek, sandbox_id, ws_base), additional_headers=auth(namek), open_timeout=10, max_size=None)
    kind, setup = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert kind == "setup", (kind, setup)
    viewer = Viewer(ws, setup)
    await viewer.send("set_size", 24, 100)
    return viewer


async def closed_with(ws: ClientConnection, timeout: float = 10) -> tuple[int, list[Any]]:
    """Read until the server closes: its close code, and the messages it sent before."""
    messages = []
    try:
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the server sent a close frame"
        return closed.rcvd.code, messages


async def test_typed_commands_run_in_the_sandbox_and_their_output_comes_back(
    live_namek: LiveNamek, shell_box: dict[str, Any]
) -> None:
    viewer = await open_viewer(live_namek, shell_box["id"])
    async with viewer.ws:
        assert viewer.setup == {"readonly": False, "sandbox": shell_box["id"], "window": 32}
        await viewer.type("echo AB$((6*7))CD $(id -u) $PWD $HOME $DISPLAY")
        await viewer.wait_for("AB42CD 61001 /sandbox/home /sandbox/home :1")
        # The sandbox's users have names (no "I have no name!" prompt).
        await viewer.type("echo WHO-$(whoami)")
        await viewer.wait_for("WHO-sandbox")


async def test_attaching_and_detaching_are_in_the_event_log(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    path = f"/api/sandboxes/{shell_box['id']}"
    before = live_namek.api("GET", path)[1]["last_event_seq"]
    viewer = await open_viewer(live_namek, shell_box["id"])
    async with viewer.ws:
        await viewer.type("echo LOGGED")
        await viewer.wait_for("LOGGED")
    deadline = time.monotonic() + 10
    logged: list[dict[str, Any]] = []
    opened: dict[str, Any] | None = None
    closed: dict[str, Any] | None = None
    # A viewer of an earlier test may still be logging its close: look for ours, in order.
    while time.monotonic() < deadline and closed is None:
        logged = live_namek.api("GET", f"{path}/events?after={before}")[1]["events"]
        opened = next((e for e in logged if e["kind"] == "terminal.opened"), None)
        if opened is not None:
            closed = next((e for e in logged if e["kind"] == "terminal.closed" and e["seq"] > opened["seq"]), None)
        await asyncio.sleep(0.1)
    assert opened is not None and closed is not None, logged
    assert (opened["actor"], opened["source"], opened["data"]) == ("owner", "person", {"readonly": False})
    assert closed["actor"] == "owner" and closed["data"]["readonly"] is False
    assert closed["data"]["code"] == 1000 and closed["data"]["seconds"] >= 0


async def test_a_second_viewer_sees_the_earlier_output(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    first = await open_viewer(live_namek, shell_box["id"])
    async with first.ws:
        await first.type("echo EARLIER$((40+2))")
        await first.wait_for("EARLIER42")
        second = await open_viewer(live_namek, shell_box["id"])
        async with second.ws:
            await second.wait_for("EARLIER42")
            # ...and both see what either types next.
            await second.type("echo BOTH$((50+5))")
            await second.wait_for("BOTH55")
            await first.wait_for("BOTH55")


async def test_a_resize_reaches_the_shells_pty(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    viewer = await open_viewer(live_namek, shell_box["id"])
    async with viewer.ws:
        await viewer.send("set_size", 33, 101)
        await asyncio.sleep(0.5)  # tmux resizes the window on the client's next redraw
        await viewer.type("echo SIZE $(stty size)")
        await viewer.wait_for("SIZE 33 101")


async def test_the_shell_comes_back_after_exit(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    viewer = await open_viewer(live_namek, shell_box["id"])
    async with viewer.ws:
        await viewer.type("export GONE=1; echo PID $$")
        await viewer.wait_for("PID ")
        await viewer.type("exit")
        await asyncio.sleep(1)
        await viewer.type("echo AGAIN$((30+3))-${GONE:-fresh}")
        await viewer.wait_for("AGAIN33-fresh")


async def test_a_flood_of_output_neither_blocks_nor_bloats_the_server(
    live_namek: LiveNamek, shell_box: dict[str, Any]
) -> None:
    assert live_namek.daphne is not None
    daphne = psutil.Process(live_namek.daphne.pid)
    before = daphne.memory_info().rss
    viewer = await open_viewer(live_namek, shell_box["id"])
    async with viewer.ws:
        # Several MB from the shell (tmux passes on what a terminal needs to show them)
        # to a reader that keeps up...
        await viewer.type("seq 1 2000000; echo FLOOD$((8*8))END")
        reading = asyncio.ensure_future(viewer.wait_for("FLOOD64END", timeout=90))
        await viewer.ws.ping()  # nothing to do with the flood: only that it started
        # ...while the server answers everyone else, promptly.
        latencies = []
        while not reading.done():
            started = time.monotonic()
            async with connect(f"{live_namek.ws_base}/ws/sandboxes/", additional_headers=auth(live_namek)) as feed:
                assert '"snapshot"' in await asyncio.wait_for(feed.recv(), 5)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
        await reading
        assert max(latencies) < 3, latencies

        # A reader that stops acknowledging gets at most a window of messages: the rest
        # waits in tmux, not in Daphne.
        viewer.acking = False
        acked = viewer.received
        await viewer.type("seq 1 2000000; echo AGAIN$((9*8))END")
        with pytest.raises(TimeoutError):
            while True:
                await viewer.read_once(3)
        assert viewer.received - acked <= viewer.setup["window"]
        stalled = daphne.memory_info().rss
        viewer.acking = True
        await viewer.send("ack", viewer.received)
        await viewer.wait_for("AGAIN72END", timeout=90)
    grown = max(stalled, daphne.memory_info().rss) - before
    assert grown < 40 * 1024 * 1024, f"Daphne grew by {grown / 1e6:.1f} MB"


async def test_two_daphne_processes_serve_the_same_shell(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    """Any web process can serve any viewer: a second Daphne on the same data dir and
    supervisor socket, and each of two viewers, one on either, sees what the other types."""
    with live_namek.second_daphne() as (port, second):
        on_a = await open_viewer(live_namek, shell_box["id"])
        async with on_a.ws:
            on_b = await open_viewer(live_namek, shell_box["id"], ws_base=f"ws://127.0.0.1:{port}")
            async with on_b.ws:
                await on_a.type("echo FROM-A$((20+3))")
                await on_b.wait_for("FROM-A23")
                await on_b.type("echo FROM-B$((30+4))")
                await on_a.wait_for("FROM-B34")
                # B's tmux client is the second Daphne's child: that process served B.
                clients = [child.cmdline() for child in psutil.Process(second.pid).children()]
                assert any("attach-session" in argv for argv in clients), clients


def tmux_clients(socket_path: str) -> list[str]:
    """The flags of every client attached to the sandbox's tmux server."""
    command = ["tmux", "-S", socket_path, "list-clients", "-F", "#{client_flags}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.split()


async def test_keystrokes_the_shell_does_not_take_close_with_4429_and_others_carry_on(
    live_namek: LiveNamek, shell_box: dict[str, Any]
) -> None:
    """A viewer suspends its tmux client (tmux's prefix, then Ctrl-Z: the tmux server stops
    reading that client's terminal) and keeps typing. Once the PTY's kernel buffer is full
    its keystrokes pile up in the web process, up to MAX_PENDING_INPUT; past that it is
    closed with 4429. A viewer beside it carries on, and the shell saw none of it."""
    argv = LocalBackend(str(live_namek.data_dir / "supervisor.sock")).open_shell(shell_box["id"])
    socket_path = str(argv[argv.index("-S") + 1])
    other = await open_viewer(live_namek, shell_box["id"])
    async with other.ws:
        await other.type("echo BEFORE$((6*6))")
        await other.wait_for("BEFORE36")
        stuck = await open_viewer(live_namek, shell_box["id"])
        async with stuck.ws:
            await stuck.wait_for("BEFORE36")  # attached: tmux drew the screen
            stuck.output = ""
            await stuck.send("stdin", "\x02\x1a")
            await stuck.wait_for("\x1b[?1049l")  # tmux gave the terminal back: it no longer reads it
            assert "suspended" in ",".join(tmux_clients(socket_path))
            # Comment lines (harmless, had they reached the shell), 60,000 bytes a frame:
            # under the 64 KiB a frame may have.
            chunk = ("#" * 99 + "\r") * 600
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                while sent < 2 * MAX_PENDING_INPUT:
                    await stuck.send("stdin", chunk)
                    sent += len(chunk)
            code, messages = await closed_with(stuck.ws)
            assert (code, messages[-1]) == (4429, ["disconnect", 4429])
            assert sent > MAX_PENDING_INPUT  # not refused before the limit
        # The server keeps serving the viewer beside it...
        await other.type("echo AFTER$((7*7))")
        await other.wait_for("AFTER49")
        # ...and ended the refused viewer's tmux client.
        deadline = time.monotonic() + 10
        while "suspended" in ",".join(flags := tmux_clients(socket_path)):
            assert time.monotonic() < deadline, f"the suspended client is still attached: {flags}"
            await asyncio.sleep(0.1)
    assert "#" * 99 not in capture_pane(socket_path)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", 4400),
        ('{"stdin": "ls"}', 4400),
        ('["shout", "ls"]', 4400),
        ('["stdin", 42]', 4400),
        (b"\x00binary", 4400),
        (json.dumps(["stdin", "x" * (64 * 1024)]), 4413),
        ('["set_size", 0, 80]', 4400),
        ('["set_size", 24, 1001]', 4400),
        ('["set_size", 24.5, 80]', 4400),
        ('["set_size", "24", "80"]', 4400),
        ('["set_size", true, 80]', 4400),
        ('["ack", 99]', 4400),
    ],
    ids=[
        "malformed-json",
        "not-an-array",
        "unknown-kind",
        "stdin-not-text",
        "binary",
        "too-big",
        "zero-rows",
        "too-many-cols",
        "float-size",
        "string-size",
        "bool-size",
        "ack-beyond-sent",
    ],
)
async def test_bad_input_closes_with_its_code(
    live_namek: LiveNamek, shell_box: dict[str, Any], frame: str | bytes, code: int
) -> None:
    async with connect(url(live_namek, shell_box["id"]), additional_headers=auth(live_namek)) as ws:
        kind, _ = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert kind == "setup"
        await ws.send(frame)
        got, messages = await closed_with(ws)
        assert got == code
        assert messages[-1] == ["disconnect", code]


async def test_outsiders_and_stopped_sandboxes_are_refused(live_namek: LiveNamek, shell_box: dict[str, Any]) -> None:
    async with connect(url(live_namek, shell_box["id"]), additional_headers=auth(live_namek, "outsider")) as ws:
        assert (await closed_with(ws))[0] == 4403
    created = live_namek.create_sandbox(name="short-lived")
    live_namek.delete_sandbox(created["id"])
    async with connect(url(live_namek, created["id"]), additional_headers=auth(live_namek)) as ws:
        assert (await closed_with(ws)) == (1011, [["disconnect", 1011]])


def capture_pane(socket_path: str) -> str:
    """What the shell's screen and scrollback hold, read by root's own tmux client."""
    command = ["tmux", "-S", socket_path, "capture-pane", "-p", "-t", "main", "-S", "-200"]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout


async def test_a_read_only_client_sees_the_shell_but_cannot_type(
    live_namek: LiveNamek, shell_box: dict[str, Any]
) -> None:
    backend = LocalBackend(str(live_namek.data_dir / "supervisor.sock"))
    argv = backend.open_shell(shell_box["id"], readonly=True)
    output: list[str] = []
    ended = asyncio.Event()

    async def on_output(text: str) -> None:
        output.append(text)
        terminal.ack(terminal.sent)

    async def on_exit() -> None:
        ended.set()

    terminal = Terminal(argv, on_output, on_exit, rows=30, cols=100)
    terminal.start()
    try:
        writer = await open_viewer(live_namek, shell_box["id"])
        async with writer.ws:
            await writer.type("echo SEEN$((7*11))")
            await writer.wait_for("SEEN77")
            deadline = time.monotonic() + 10
            while "SEEN77" not in "".join(output):
                assert time.monotonic() < deadline, "the read-only client saw nothing"
                await asyncio.sleep(0.1)
            terminal.write("echo TYPED$((9*9))\r")
            await asyncio.sleep(1.5)
            await writer.type("echo AFTER$((2*2))")
            await writer.wait_for("AFTER4")
        screen = capture_pane(str(argv[argv.index("-S") + 1]))
        assert "AFTER4" in screen
        assert "TYPED" not in screen  # neither the command line nor its output
        assert not ended.is_set()
    finally:
        await terminal.close()
    assert terminal.process is not None and terminal.process.poll() is not None


async def test_a_viewer_who_may_not_type_has_its_keystrokes_dropped() -> None:
    """The consumer's own rule, on a real PTY running cat (which would echo them)."""
    output: list[str] = []

    async def on_output(text: str) -> None:
        output.append(text)
        terminal.ack(terminal.sent)

    async def on_exit() -> None:
        pass

    terminal = Terminal(["cat"], on_output, on_exit)
    terminal.start()
    consumer = TerminalConsumer()
    consumer.terminal, consumer.readonly = terminal, True
    consumer.scope = {"user": SimpleNamespace(pk=5, is_authenticated=True)}
    consumer.inputs = Counter()
    granted = {"sandbox": 1, "version": 3, "holder": "person", "user_id": 5, "granted": True, "span": 1, "run": None}
    try:
        consumer.handle(["stdin", "dropped\r"])  # read-only, and nobody holds control
        consumer.readonly = False
        consumer.handle(["stdin", "dropped too\r"])  # another user holds it
        consumer.lease = {**granted, "user_id": 6}
        consumer.handle(["stdin", "dropped as well\r"])
        await asyncio.sleep(0.5)
        assert "dropped" not in "".join(output)
        consumer.lease = granted
        consumer.handle(["stdin", "passed\r"])
        deadline = time.monotonic() + 5
        while "passed" not in "".join(output):
            assert time.monotonic() < deadline, output
            await asyncio.sleep(0.05)
        assert "dropped" not in "".join(output)
    finally:
        await terminal.close()
    assert terminal.process is not None and terminal.process.poll() is not None


@pytest.mark.browser
async def test_mount_terminal_types_into_the_shell_from_a_real_browser(
    live_namek: LiveNamek, shell_box: dict[str, Any], browser: Any
) -> None:
    """static/namek/terminal.js on the sandbox page, in Debian's Chromium."""
    from tests.test_e2e_browser import log_in

    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, live_namek.base_url)
    await page.goto(f"{live_namek.base_url}/sandboxes/{shell_box['id']}/")
    await page.evaluate(
        """async (id) => {
            const box = Object.assign(document.createElement("div"), { id: "terminal-test" });
            box.style.cssText = "width: 800px; height: 400px";
            document.body.prepend(box);
            const { mountTerminal } = await import("/static/namek/terminal.js");
            window.terminalState = "";
            window.terminalPane = mountTerminal(box, id,
                { onState: (text) => { window.terminalState = text; } });
        }""",
        shell_box["id"],
    )
    await page.wait_for_function("window.terminalState === 'Live'", timeout=15000)
    await page.evaluate("window.terminalPane.focus()")
    await page.keyboard.type("echo WEB$((5*5))PAGE\n")
    await page.wait_for_function(
        "document.querySelector('#terminal-test .xterm-rows').textContent.includes('WEB25PAGE')",
        timeout=15000,
    )
    # The module brought xterm.js's stylesheet along.
    await page.wait_for_function(
        "getComputedStyle(document.querySelector('.xterm-helpers')).position === 'absolute'", timeout=5000
    )
    assert await page.locator("link[data-xterm]").count() == 1
    await page.evaluate("window.terminalPane.stop()")
    assert errors == []
    await page.close()


def test_a_sandbox_claimed_from_the_warm_pool_has_its_shell(tmp_path: Path) -> None:
    """A claim renames the sandbox's directory: the tmux socket must follow."""
    namek = LiveNamek(tmp_path, NAMEK_WARM_POOL="1")
    try:
        namek.start()
        deadline = time.monotonic() + 60
        while LocalBackend(str(namek.data_dir / "supervisor.sock")).ping()["warm"]["ready"] < 1:
            assert time.monotonic() < deadline, "no warm sandbox became ready"
            time.sleep(0.2)
        created = namek.create_sandbox(name="claimed")
        assert namek.api("POST", f"/api/sandboxes/{created['id']}/takeover")[0] == 200

        async def echo() -> None:
            viewer = await open_viewer(namek, created["id"])
            async with viewer.ws:
                await viewer.type("echo WARM$((3*3)) $HOME")
                await viewer.wait_for("WARM9 /sandbox/home")

        asyncio.run(echo())
        namek.delete_sandbox(created["id"])
    finally:
        namek.stop()

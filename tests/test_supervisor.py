"""The local sandbox supervisor against real processes: isolation seen from inside a
sandbox, Chromium restarts, lifetimes (delete, a killed supervisor), the lock, refusing to
run without isolation, bad input on its socket, and failed starts.

See the docstrings of ``sandboxes/local/supervisor.py`` and ``sandbox-init.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, unix_connect

from sandboxes.local.protocol import MAX_LINE
from tests.live import LiveNamek, marked_processes

pytestmark = pytest.mark.processes

SCREEN_UID = 61000
USER_UID = 61001
FORWARDER_UID = 61002

# --- processes of a sandbox ----------------------------------------------------------------


def environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def sandbox_pids(live: LiveNamek, sandbox_id: int) -> list[int]:
    """Processes that carry the sandbox's marker (Chromium's children do not: they rewrite
    their command line over their environment)."""
    wanted = f"NAMEK_SANDBOX_ID={sandbox_id}".encode()
    return [pid for pid in marked_processes(live.data_dir) if wanted in environ(pid)]


def sandbox_tree(live: LiveNamek, sandbox_id: int) -> list[psutil.Process]:
    """The marked processes of a sandbox and all their descendants."""
    found: dict[int, psutil.Process] = {}
    for pid in sandbox_pids(live, sandbox_id):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            found[pid] = process
            for child in process.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a pid reused since does not count; zombies are dead)."""
    living = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
    return living


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def wait_all_dead(processes: list[psutil.Process], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while (living := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not living, f"{what}: still running: {[describe(p) for p in living]}"


def name_of(process: psutil.Process) -> str:
    """Its name, or "" when it has ended meanwhile (forwarders fork per connection)."""
    with contextlib.suppress(psutil.Error):
        return str(process.name())
    return ""


def describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {process.name()} {' '.join(process.cmdline())[:100]}"
    return str(process.pid)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def chromium_main(live: LiveNamek, sandbox_id: int) -> int:
    """The sandbox's Chromium browser process (not a zygote, renderer or helper)."""

    def find() -> int | None:
        for pid in sandbox_pids(live, sandbox_id):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if Path(f"/proc/{pid}/comm").read_text().strip() == "chromium" and not any(
                    arg.startswith(b"--type=") for arg in cmdline
                ):
                    return pid
        return None

    return int(wait_until(find, 15, f"Chromium of sandbox {sandbox_id}"))


def sandbox_shell(live: LiveNamek, sandbox_id: int, script: str, *args: str, timeout: float = 30) -> str:
    """Run a Python script in the sandbox's namespaces as its browser user, the way a shell
    there would (clean environment, no new privileges). Returns its stdout."""
    target = chromium_main(live, sandbox_id)
    command = ["nsenter", "-t", str(target), "-m", "-n", "-p", "-r", "-w", "--"]
    command += ["setpriv", f"--reuid={USER_UID}", f"--regid={USER_UID}", "--clear-groups"]
    command += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    command += ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/sandbox/home", "python3", "-c", script, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"shell in sandbox {sandbox_id} failed: {result.stderr[-2000:]}"
    return result.stdout


# --- CDP over the sandbox's UNIX socket ---------------------------------------------------


def cdp_http(path: str, target: str, timeout: float = 5) -> Any:
    """GET a CDP HTTP endpoint (/json/list, /json/version) over the UNIX socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"CDP closed the connection: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"200", head
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        assert match, head
        while len(body) < int(match.group(1)):
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
    return json.loads(body)


def cdp_pages(path: str) -> list[dict[str, Any]]:
    return [target for target in cdp_http(path, "/json/list") if target["type"] == "page"]


class Cdp:
    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.websocket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self.websocket.recv(), 30))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return dict(message["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def cdp_connect(path: str, ws_url: str) -> Any:
    path_part = ws_url.split("127.0.0.1", 1)[1]
    async with unix_connect(path, f"ws://127.0.0.1{path_part}", max_size=None) as websocket:
        yield Cdp(websocket)


def fetch_expression(url: str) -> str:
    """What a page sees when it tries to reach ``url`` (no-cors: any answer counts)."""
    return f"fetch({json.dumps(url)}, {{mode: 'no-cors', cache: 'no-store'}}).then(r => 'reached', e => 'failed: ' + e)"


# --- a TCP server on the host -------------------------------------------------------------


@contextlib.contextmanager
def host_tcp_server() -> Iterator[tuple[int, Callable[[], int]]]:
    """A listening socket on all of the host's addresses; yields (port, connections seen)."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.setblocking(False)
    seen = 0

    def connections() -> int:
        nonlocal seen
        while True:
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                return seen
            conn.close()
            seen += 1

    try:
        yield server.getsockname()[1], connections
    finally:
        server.close()


def host_address() -> str | None:
    """A non-loopback address of this host, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else str(address)


# --- the supervisor's socket --------------------------------------------------------------


def supervisor_exchange(live: LiveNamek, payload: bytes, timeout: float = 10) -> dict[str, Any] | None:
    """Send raw bytes, read one reply line; None when the supervisor closes without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(live.data_dir / "supervisor.sock"))
        sock.sendall(payload)
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_LINE)
    return json.loads(line) if line else None


def supervisor_call(live: LiveNamek, **request: Any) -> dict[str, Any]:
    reply = supervisor_exchange(live, json.dumps(request).encode() + b"\n")
    assert reply is not None
    return reply


def assert_supervisor_answers(live: LiveNamek) -> None:
    reply = supervisor_call(live, op="ping")
    assert reply["ok"] is True, reply
    assert reply["pid"] == live.supervisor.pid  # type: ignore[union-attr]


# --- fixtures -----------------------------------------------------------------------------


@dataclass
class Pair:
    a: dict[str, Any]
    b: dict[str, Any]


@pytest.fixture(scope="module")
def pair(live_namek: LiveNamek) -> Iterator[Pair]:
    """Two ready sandboxes, A and B, shared by the isolation tests (each takes seconds)."""
    created: list[dict[str, Any]] = []
    try:
        created.append(live_namek.create_sandbox(name="isolation-a"))
        created.append(live_namek.create_sandbox(name="isolation-b"))
        yield Pair(*created)
    finally:
        for sandbox in created:
            live_namek.delete_sandbox(sandbox["id"])


@pytest.fixture
def namek_factory(tmp_path: Path) -> Iterator[Callable[..., LiveNamek]]:
    """Build Nameks of one's own with env overrides; stopped after the test."""
    made: list[LiveNamek] = []

    def make(name: str, **env: str) -> LiveNamek:
        base = tmp_path / name
        base.mkdir()
        namek = LiveNamek(base, **env)
        made.append(namek)
        return namek

    try:
        yield make
    finally:
        errors = []
        for namek in made:
            try:
                namek.stop()
            except AssertionError as exc:
                errors.append(exc)
        assert not errors, errors


# --- 1. isolation ---------------------------------------------------------------------------


def test_sandbox_processes_run_as_unprivileged_users_without_capabilities(live_namek: LiveNamek, pair: Pair) -> None:
    tree = sandbox_tree(live_namek, pair.a["id"])
    seen = set()
    for process in tree:
        try:
            name = process.name()
            cmdline = process.cmdline()
            status = proc_status(process.pid)
        except (psutil.Error, OSError):
            continue  # ended meanwhile (a forwarder's connection child, a short sleep)
        uid = int(status["Uid"].split()[0])
        if uid == 0:
            # Only the scaffolding stays root: bubblewrap and the init script (and its sleeps).
            assert name in ("bwrap", "bash", "sleep", "seq"), (name, cmdline)
            if name == "bash":
                assert cmdline[-1] == "/init.sh", cmdline
                # Root in name only: no capability but the three it needs to drop to the users.
                setuid_setgid_setpcap = (1 << 6) | (1 << 7) | (1 << 8)
                assert int(status["CapEff"], 16) == setuid_setgid_setpcap, status["CapEff"]
            continue
        seen.add(name)
        expected = {"Xvnc": SCREEN_UID, "socat": FORWARDER_UID}.get(name, USER_UID)
        if expected == USER_UID:  # the browser's family (zygotes, renderers, GPU, crashpad...), the shell's
            shell = name == "tmux: server" or (name == "bash" and cmdline[0] in ("/bin/bash", "-bash", "bash"))
            assert shell or cmdline[0].startswith("/usr/lib/chromium/"), (name, uid, cmdline)
        assert set(status["Uid"].split()) == {str(expected)}, (name, status["Uid"])
        assert set(status["Gid"].split()) == {str(expected)}, (name, status["Gid"])
        assert status["Groups"] == "", (name, status["Groups"])
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (name, caps, status[caps])
        assert status["NoNewPrivs"] == "1", name
    assert {"Xvnc", "socat", "chromium", "tmux: server"} <= seen, seen
    # Chromium is a family of processes (zygotes, renderers, GPU, network service): all checked.
    assert sum(" chromium " in describe(p) for p in tree) >= 3, [describe(p) for p in tree]


def test_the_browser_user_cannot_read_its_own_vnc_password(live_namek: LiveNamek, pair: Pair) -> None:
    script = r"""
import json, os, socket
out = {}
for path in ("/sandbox/screen/passwd", "/sandbox/screen/xvnc.log"):
    try:
        open(path, "rb").read()
        out[path] = "read"
    except OSError as exc:
        out[path] = type(exc).__name__
try:
    os.listdir("/sandbox/screen")
    out["list"] = "listed"
except OSError as exc:
    out["list"] = type(exc).__name__
with socket.socket(socket.AF_UNIX) as sock:
    try:
        sock.connect("/sandbox/screen/vnc.sock")
        out["vnc"] = "connected"
    except OSError as exc:
        out["vnc"] = type(exc).__name__
print(json.dumps(out))
"""
    out = json.loads(sandbox_shell(live_namek, pair.a["id"], script))
    assert out == {
        "/sandbox/screen/passwd": "PermissionError",
        "/sandbox/screen/xvnc.log": "PermissionError",
        "list": "PermissionError",
        "vnc": "PermissionError",
    }
    # ...while the password file is there, and Namek can use the screen.
    assert (live_namek.sandbox_dir(pair.a["id"]) / "screen" / "passwd").stat().st_uid == SCREEN_UID
    assert live_namek.screen_target(pair.a["id"])[1]


SHELL_PROBE = r"""
import json, os, socket, sys, urllib.request
args = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "root": sorted(os.listdir("/"))}
out["sandbox"] = [n for n in ("cdp", "home", "namek.sock", "screen") if os.path.lexists("/sandbox/" + n)]
out["exists"] = {path: os.path.lexists(path) for path in args["absent"]}

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return type(exc).__name__

def read(path):
    with open(path, "rb") as handle:
        handle.read()

def unix(path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(3)
        sock.connect(path)

def tcp(host, port):
    with socket.socket() as sock:
        sock.settimeout(3)
        sock.connect((host, port))

out["list_sandbox"] = attempt(lambda: os.listdir("/sandbox"))
out["read"] = {path: attempt(lambda: read(path)) for path in args["absent"]}
out["unix"] = {path: attempt(lambda: unix(path)) for path in args["sockets"]}
out["tcp"] = {f"{host}:{port}": attempt(lambda: tcp(host, port)) for host, port in args["tcp"]}
# Swapping the CDP socket Namek dials for a symlink to another sandbox's:
out["swap"] = {
    "unlink": attempt(lambda: os.unlink("/sandbox/cdp/cdp.sock")),
    "symlink": attempt(lambda: os.symlink(args["other_cdp"], "/sandbox/cdp/other.sock")),
    "rename": attempt(lambda: os.rename("/sandbox/cdp", "/sandbox/cdp-old")),
}
with urllib.request.urlopen("http://127.0.0.1:9222/json/list", timeout=10) as response:
    out["cdp_list"] = json.load(response)
with urllib.request.urlopen(args["namek_url"], timeout=20) as response:
    out["namek"] = [response.status, response.read().decode(errors="replace")]
print(json.dumps(out))
"""


def test_a_shell_in_one_sandbox_reaches_neither_the_other_sandbox_nor_namek_data_nor_the_host(
    live_namek: LiveNamek, pair: Pair
) -> None:
    a, b = pair.a["id"], pair.b["id"]
    b_dir = live_namek.sandbox_dir(b)
    a_dir = live_namek.sandbox_dir(a)
    data = live_namek.data_dir
    start_a = cdp_pages(live_namek.browser_socket(a))[0]["url"]
    start_b = cdp_pages(live_namek.browser_socket(b))[0]["url"]
    assert start_a != start_b
    absent = [
        str(b_dir / "screen" / "vnc.sock"),
        str(b_dir / "screen" / "passwd"),
        str(b_dir / "cdp" / "cdp.sock"),
        str(b_dir),
        str(a_dir),  # its own directory is at /sandbox, not at its host path
        str(data / "secret_key"),
        str(data / "db.sqlite3"),
        str(data / "supervisor.sock"),
        str(data),
        str(b_dir / "tmux" / "tmux.sock"),  # the other sandbox's shell
    ]
    for path in absent[:3] + absent[5:8]:
        assert os.path.lexists(path), f"{path} should exist on the host"
    address = host_address()
    with host_tcp_server() as (port, connections):
        targets = [["127.0.0.1", port]] + ([[address, port]] if address else [])
        args = {
            "absent": absent,
            "sockets": [
                str(b_dir / "screen" / "vnc.sock"),
                str(b_dir / "cdp" / "cdp.sock"),
                str(data / "supervisor.sock"),
                str(b_dir / "tmux" / "tmux.sock"),
            ],
            "tcp": targets,
            "other_cdp": str(b_dir / "cdp" / "cdp.sock"),
            "namek_url": start_a,
        }
        out = json.loads(sandbox_shell(live_namek, a, SHELL_PROBE, json.dumps(args)))
        assert connections() == 0
    assert out["uid"] == USER_UID
    assert out["root"] == [
        "bin",
        "dev",
        "etc",
        "init.sh",
        "lib",
        "lib64",
        "proc",
        "sandbox",
        "sbin",
        "tmp",
        "tmux.conf",
        "usr",
    ]
    assert out["sandbox"] == ["cdp", "home", "namek.sock", "screen"]
    assert out["list_sandbox"] == "PermissionError"
    assert out["exists"] == dict.fromkeys(absent, False)
    assert set(out["read"].values()) == {"FileNotFoundError"}, out["read"]
    assert set(out["unix"].values()) == {"FileNotFoundError"}, out["unix"]
    assert out["tcp"][f"127.0.0.1:{port}"] == "ConnectionRefusedError"
    if address:
        assert out["tcp"][f"{address}:{port}"] == "OSError", out["tcp"]  # network unreachable
    assert out["swap"] == {
        "unlink": "PermissionError",
        "symlink": "PermissionError",
        "rename": "PermissionError",
    }
    # 127.0.0.1:9222 there is its own Chromium: its start page, never B's.
    pages = [target for target in out["cdp_list"] if target["type"] == "page"]
    assert [page["url"] for page in pages] == [start_a]
    assert all(start_b not in json.dumps(target) for target in out["cdp_list"])
    assert "isolation-b" not in json.dumps(out["cdp_list"])
    # The positive control: Namek's internal URL is reachable, through the forwarder.
    assert out["namek"][0] == 200
    assert "isolation-a" in out["namek"][1]
    # And the CDP socket Namek dials for A still leads to A's browser.
    assert [page["url"] for page in cdp_pages(live_namek.browser_socket(a))] == [start_a]


async def test_a_page_in_one_sandbox_cannot_reach_host_services_but_loads_namek(
    live_namek: LiveNamek, pair: Pair
) -> None:
    path = live_namek.browser_socket(pair.a["id"])
    page = cdp_pages(path)[0]
    assert page["url"].startswith(live_namek.base_url + "/sandboxes/start/")
    address = host_address()
    with host_tcp_server() as (port, connections):
        async with cdp_connect(path, page["webSocketDebuggerUrl"]) as cdp:
            assert await cdp.evaluate(fetch_expression(page["url"])) == "reached"
            assert await cdp.evaluate(f"fetch({json.dumps(page['url'])}).then(r => r.status)") == 200
            assert await cdp.evaluate(fetch_expression(live_namek.base_url + "/login/")) == "reached"
            for url in [f"http://127.0.0.1:{port}/", f"http://localhost:{port}/"] + (
                [f"http://{address}:{port}/"] if address else []
            ):
                outcome = await cdp.evaluate(fetch_expression(url))
                assert outcome.startswith("failed: TypeError"), (url, outcome)
        assert connections() == 0


async def test_a_page_in_one_sandbox_cannot_open_namek_data_or_the_other_sandbox_as_files(
    live_namek: LiveNamek, pair: Pair
) -> None:
    path = live_namek.browser_socket(pair.a["id"])
    b_dir = live_namek.sandbox_dir(pair.b["id"])
    data = live_namek.data_dir
    version = cdp_http(path, "/json/version")
    async with cdp_connect(path, version["webSocketDebuggerUrl"]) as browser:
        target = (await browser.call("Target.createTarget", url="about:blank"))["targetId"]
        try:
            async with cdp_connect(path, f"ws://127.0.0.1/devtools/page/{target}") as cdp:

                async def navigate(url: str) -> tuple[str | None, str]:
                    result = await cdp.call("Page.navigate", url=url)
                    text = ""
                    for _ in range(100):  # until the new document (or the error page) is there
                        try:
                            text = await cdp.evaluate(
                                "document.readyState + '\\n' + location.href + '\\n'"
                                " + (document.body ? document.body.innerText : '')"
                            )
                        except AssertionError:  # the old document went away under us
                            text = ""
                        state, _, text = str(text).partition("\n")
                        if state == "complete" and text.startswith((url, "chrome-error://")):
                            break
                        await asyncio.sleep(0.05)
                    return result.get("errorText"), text

                # Positive controls: file:// works for what the sandbox does see.
                error, text = await navigate("file:///etc/hostname")
                assert error is None and text.split("\n")[1].strip() == socket.gethostname(), (error, text)
                error, text = await navigate("file:///sandbox/home/")
                assert error is None and "profile" in text, (error, text)
                for url in [
                    f"file://{data}/secret_key",
                    f"file://{data}/db.sqlite3",
                    f"file://{data}/",
                    f"file://{b_dir}/screen/passwd",
                    f"file://{b_dir}/screen/vnc.sock",
                    f"file://{b_dir}/cdp/cdp.sock",
                    "file:///sandbox/screen/passwd",
                ]:
                    error, text = await navigate(url)
                    assert error in ("net::ERR_FILE_NOT_FOUND", "net::ERR_ACCESS_DENIED"), (url, error, text)
                    assert text.startswith("chrome-error://"), (url, text)
        finally:
            await browser.call("Target.closeTarget", targetId=target)


# --- 2. Chromium restarts ---------------------------------------------------------------------


def test_a_killed_chromium_is_restarted_and_the_api_says_why(live_namek: LiveNamek, sandbox: dict) -> None:
    sandbox_id = sandbox["id"]
    path = live_namek.browser_socket(sandbox_id)
    before = chromium_main(live_namek, sandbox_id)
    os.kill(before, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        status, body = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}")
        assert status == 200
        return body if body["browser_restarts"] >= 1 else None

    body = wait_until(restarted, 20, "browser_restarts in the API")
    assert body["last_browser_exit"] == "Chromium killed by SIGKILL; restarted"
    assert body["phase"] == "ready"
    after = chromium_main(live_namek, sandbox_id)
    assert after != before
    # CDP answers again, with the start page loaded anew.
    pages = wait_until(lambda: _quiet(lambda: cdp_pages(path)), 20, "CDP after the restart")
    assert pages[0]["url"].startswith(live_namek.base_url + "/sandboxes/start/")
    assert live_namek.browser_socket(sandbox_id) == path
    time.sleep(1)
    _, body = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}")
    assert body["phase"] == "ready" and body["browser_restarts"] == 1, body


def _quiet(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (OSError, AssertionError, ValueError):
        return None


def test_a_restarted_chromium_does_not_follow_a_log_symlink_planted_by_the_browser_user(
    live_namek: LiveNamek, sandbox: dict
) -> None:
    """The init script (root) keeps its logs where the browser user cannot plant links."""
    sandbox_id = sandbox["id"]
    directory = live_namek.sandbox_dir(sandbox_id)
    script = r"""
import os, signal
for log in ("chromium.log", "socat.log", "xvnc.log"):
    try:
        os.unlink(f"/sandbox/logs/{log}")
        print("unlinked a log")
    except PermissionError:
        pass
os.symlink("/sandbox/screen/planted", "/sandbox/home/chromium.log")
os.symlink("/sandbox/cdp/planted", "/sandbox/home/socat.log")
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmdline[0].endswith(b"/chromium") and not any(a.startswith(b"--type=") for a in cmdline):
            os.kill(int(entry), signal.SIGKILL)
            print("killed")
"""
    assert sandbox_shell(live_namek, sandbox_id, script).split() == ["killed"]

    def restarted() -> bool:
        _, body = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}")
        return bool(body["browser_restarts"] >= 1)

    wait_until(restarted, 20, "the restart")
    wait_until(lambda: _quiet(lambda: cdp_pages(live_namek.browser_socket(sandbox_id))), 20, "CDP after restart")
    assert not (directory / "screen" / "planted").exists()
    assert not (directory / "cdp" / "planted").exists()
    assert live_namek.wait_phase(sandbox_id, "ready")["phase"] == "ready"


# --- 3. delete ----------------------------------------------------------------------------------


def test_delete_leaves_no_process_directory_or_socket(live_namek: LiveNamek) -> None:
    created = live_namek.create_sandbox(name="to-delete")
    sandbox_id = created["id"]
    deleted = False
    try:
        directory = live_namek.sandbox_dir(sandbox_id)
        tree = sandbox_tree(live_namek, sandbox_id)
        assert len(tree) >= 8, [describe(p) for p in tree]
        sockets = [
            directory / "screen" / "vnc.sock",
            directory / "cdp" / "cdp.sock",
            directory / "namek.sock",
        ]
        assert all(path.is_socket() for path in sockets)
        assert live_namek.delete_sandbox(sandbox_id)["phase"] == "stopped"
        deleted = True
        wait_all_dead(tree, 5, "processes of the deleted sandbox")
        assert sandbox_pids(live_namek, sandbox_id) == []
        assert not directory.exists()
        assert not any(path.exists() for path in sockets)
        reply = supervisor_call(live_namek, op="status", id=sandbox_id)
        assert reply["ok"] is False and "no local sandbox" in reply["error"]
        # Deleting again is harmless.
        assert live_namek.delete_sandbox(sandbox_id)["phase"] == "stopped"
    finally:
        if not deleted:
            live_namek.delete_sandbox(sandbox_id)


# --- 4. a killed supervisor ------------------------------------------------------------------------


def test_a_killed_supervisor_takes_its_sandboxes_along_and_a_restarted_one_marks_them_failed(
    fresh_namek: LiveNamek,
) -> None:
    namek = fresh_namek.start()
    ids = [namek.create_sandbox(name=f"doomed-{n}")["id"] for n in range(2)]
    trees = {sandbox_id: sandbox_tree(namek, sandbox_id) for sandbox_id in ids}
    assert all(len(tree) >= 8 for tree in trees.values())
    assert namek.supervisor and namek.daphne
    namek.supervisor.kill()
    namek.supervisor.wait(10)

    # Nothing else kills them: bubblewrap's --die-with-parent does.
    for sandbox_id, tree in trees.items():
        wait_all_dead(tree, 10, f"sandbox {sandbox_id} after the supervisor's SIGKILL")
    assert marked_processes(namek.data_dir) == []
    assert namek.daphne.poll() is None

    namek.start_supervisor()
    for sandbox_id in ids:
        body = namek.wait_phase(sandbox_id, "failed", timeout=20)
        assert body["failure_reason"] == "Namek restarted", body
    assert marked_processes(namek.data_dir) == []
    sandboxes_dir = namek.data_dir / "sandboxes"
    assert list(sandboxes_dir.iterdir()) == []
    assert [path for path in namek.data_dir.rglob("*") if path.is_socket()] == [namek.data_dir / "supervisor.sock"]
    assert namek.daphne.poll() is None
    # The restarted supervisor serves: a new sandbox starts and goes away cleanly.
    again = namek.create_sandbox(name="after-restart")
    assert namek.delete_sandbox(again["id"])["phase"] == "stopped"
    assert marked_processes(namek.data_dir) == []


# --- 5. the lock -----------------------------------------------------------------------------------


def test_a_second_supervisor_on_the_same_data_dir_refuses_to_start(fresh_namek: LiveNamek) -> None:
    namek = fresh_namek.start()
    created = namek.create_sandbox(name="survivor")
    core = [p for p in sandbox_tree(namek, created["id"]) if name_of(p) in ("bwrap", "Xvnc")]
    core.append(psutil.Process(chromium_main(namek, created["id"])))
    first = namek.supervisor
    assert first
    second = namek.manage("namek_supervisor", check=False, timeout=60)
    assert second.returncode != 0
    assert "another sandbox supervisor already runs" in second.stderr, second.stderr
    assert f"pid {first.pid}" in second.stderr, second.stderr
    # The first one still runs, serves, and its sandbox is untouched.
    assert first.poll() is None
    assert_supervisor_answers(namek)
    assert len(core) == 4 and alive(core) == core, [describe(p) for p in core]
    assert namek.wait_phase(created["id"], "ready")["phase"] == "ready"
    assert cdp_pages(namek.browser_socket(created["id"]))
    assert (namek.data_dir / "supervisor.lock").read_text().strip() == str(first.pid)
    assert namek.delete_sandbox(created["id"])["phase"] == "stopped"


# --- 6. without isolation --------------------------------------------------------------------------


FAKE_BWRAP = """#!/bin/sh
echo "bwrap: No permissions to creating new namespace" >&2
exit 1
"""


@pytest.mark.parametrize("how", ["no bwrap on PATH", "bwrap cannot create namespaces"])
def test_the_supervisor_refuses_to_run_without_isolation_and_names_the_way_out(tmp_path: Path, how: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if how == "bwrap cannot create namespaces":
        fake = bin_dir / "bwrap"
        fake.write_text(FAKE_BWRAP)
        fake.chmod(0o755)
    namek = LiveNamek(tmp_path, PATH=str(bin_dir))
    result = namek.manage("namek_supervisor", check=False, timeout=60)
    assert result.returncode != 0
    assert "cannot isolate local sandboxes" in result.stderr, result.stderr
    assert "NAMEK_LOCAL_ISOLATION=off" in result.stderr, result.stderr
    expected = "not installed" if how == "no bwrap on PATH" else "cannot create namespaces"
    assert expected in result.stderr, result.stderr
    assert not (namek.data_dir / "supervisor.sock").exists()
    assert not (namek.data_dir / "sandboxes").exists()


def test_with_isolation_off_a_sandbox_becomes_ready_and_is_deleted_cleanly(
    namek_factory: Callable[..., LiveNamek],
) -> None:
    namek = namek_factory("off", NAMEK_LOCAL_ISOLATION="off").start()
    assert supervisor_call(namek, op="ping")["isolation"] is False
    created = namek.create_sandbox(name="unisolated")
    sandbox_id = created["id"]
    directory = namek.sandbox_dir(sandbox_id)
    tree = sandbox_tree(namek, sandbox_id)
    # Chromium's helpers do not carry the marker: remember every Chromium that uses this
    # sandbox's profile too, wherever it sits in the process tree.
    profile = str(directory / "home" / "profile")
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(profile in arg for arg in process.cmdline()) and process.pid not in {p.pid for p in tree}:
                tree.append(process)
    names = {name_of(p) for p in alive(tree)}
    assert {"Xvnc", "chromium"} <= names, names
    assert "bwrap" not in names
    assert cdp_pages(namek.browser_socket(sandbox_id))
    assert namek.delete_sandbox(sandbox_id)["phase"] == "stopped"
    wait_all_dead(tree, 5, "processes of the deleted unisolated sandbox")
    assert marked_processes(namek.data_dir) == []
    assert not directory.exists()


# --- 7. bad input on the supervisor's socket ----------------------------------------------------


def create_request(**fields: Any) -> bytes:
    request = {
        "op": "create",
        "id": 987654321,
        "name": "x",
        "width": 800,
        "height": 600,
        "start_url": "about:blank",
    }
    return json.dumps({**request, **fields}).encode() + b"\n"


BAD_REQUESTS: list[tuple[bytes, str]] = [
    (b"this is not json\n", "bad request"),
    (b"\xff\xfe\x00garbage\n", "bad request"),
    (b"[1, 2, 3]\n", "expected a JSON object"),
    (b'"create"\n', "expected a JSON object"),
    (b"{}\n", "unknown op"),
    (b'{"op": "frobnicate"}\n', "unknown op 'frobnicate'"),
    (b'{"op": "status", "id": "not-a-number"}\n', "bad request"),
    (b'{"op": "status", "id": null}\n', "bad request"),
    (b'{"op": "status", "id": 987654321}\n', "no local sandbox 987654321"),
    (b'{"op": "screen", "id": 987654321}\n', "no local sandbox 987654321"),
    (b'{"op": "create", "id": 987654321}\n', "bad request"),
    (create_request(width=0), "bad screen size"),
    (create_request(height=99999), "bad screen size"),
    (create_request(width=-800), "bad screen size"),
    (create_request(width="wide"), "bad request"),
    (b'{"op": "delete"}\n', "bad request"),
    (b'{"op": "status", "id": 1', "bad request"),  # no newline: the client closes its side
]


def test_bad_requests_on_the_supervisor_socket_get_errors_and_it_keeps_serving(
    live_namek: LiveNamek, pair: Pair
) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(live_namek.data_dir / "supervisor.sock"))  # a client that never speaks
    try:
        for payload, expected in BAD_REQUESTS:
            if payload.endswith(b"\n"):
                reply = supervisor_exchange(live_namek, payload)
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(live_namek.data_dir / "supervisor.sock"))
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    with sock.makefile("rb") as stream:
                        line = stream.readline(MAX_LINE)
                reply = json.loads(line) if line else None
            assert reply is not None, payload
            assert reply["ok"] is False, (payload, reply)
            assert expected in reply["error"], (payload, reply)
            assert reply["retryable"] is False, (payload, reply)
            assert_supervisor_answers(live_namek)
        # An op it does not know, for a sandbox it has.
        reply = supervisor_call(live_namek, op="frobnicate", id=pair.a["id"])
        assert reply["ok"] is False and "unknown op 'frobnicate'" in reply["error"], reply
        # A line longer than the protocol allows: dropped without a reply.
        try:
            reply = supervisor_exchange(live_namek, b'{"op": "ping", "pad": "' + b"x" * (MAX_LINE + 10) + b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            reply = None
        assert reply is None, reply
        assert_supervisor_answers(live_namek)
        # None of that created anything, and the sandboxes it has are untouched.
        assert not live_namek.sandbox_dir(987654321).exists()
        listed = supervisor_call(live_namek, op="list")["sandboxes"]
        assert 987654321 not in [s["id"] for s in listed]
        status = supervisor_call(live_namek, op="status", id=pair.a["id"])
        assert status["ok"] is True and status["phase"] == "ready", status
    finally:
        idle.close()
    assert_supervisor_answers(live_namek)


# --- 8. a failed start ---------------------------------------------------------------------------


def test_a_sandbox_that_cannot_start_is_reported_failed_and_leaves_nothing(
    namek_factory: Callable[..., LiveNamek],
) -> None:
    namek = namek_factory("broken", NAMEK_CHROMIUM="/nonexistent/chromium", NAMEK_SANDBOX_START_TIMEOUT="5").start()
    status, created = namek.api("POST", "/api/sandboxes", body={"name": "never-ready"})
    assert status == 201, created
    sandbox_id = created["id"]
    seen = wait_until(lambda: sandbox_tree(namek, sandbox_id), 10, "the sandbox's processes")
    body = namek.wait_phase(sandbox_id, "failed", timeout=30)
    assert "not ready after 5 s" in body["failure_reason"], body
    wait_all_dead(seen, 5, "processes of the failed sandbox")
    assert sandbox_pids(namek, sandbox_id) == []
    wait_until(lambda: not namek.sandbox_dir(sandbox_id).exists(), 10, "the failed sandbox's directory removed")
    reply = supervisor_call(namek, op="status", id=sandbox_id)
    assert reply["ok"] is True and reply["phase"] == "failed", reply
    # Deleting a failed sandbox keeps its reason.
    stopped = namek.delete_sandbox(sandbox_id)
    assert stopped["phase"] == "stopped" and "not ready" in stopped["failure_reason"], stopped
    assert_supervisor_answers(namek)

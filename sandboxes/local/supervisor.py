"""The one process that owns local sandboxes.

Each sandbox is a group of real processes started from ``sandbox-init.sh``: TigerVNC's
``Xvnc``, Chromium with the DevTools protocol, socat forwarders, and a tmux server that
holds the sandbox's shell. With isolation on
(the default) the group runs under bubblewrap in its own PID, network, IPC and mount
namespaces, as unprivileged users (the screen server, the browser and the forwarders as
three different ones, so that the browser can neither read the VNC password file nor
swap the CDP socket), seeing only ``/usr``, ``/etc`` and its own directory. The VNC
server and CDP are reached through UNIX sockets in the sandbox directory; the sandbox
reaches Namek's internal URL only through a socket the supervisor serves and forwards.

Lifetimes: bubblewrap runs with ``--die-with-parent``, so a killed supervisor takes its
sandboxes with it (without isolation they outlive a SIGKILLed supervisor until the next
one starts); at start the supervisor sweeps any leftover process, directory or
socket and marks the sandboxes it had as failed ("Namek restarted").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from sandboxes import rfb
from sandboxes.local import protocol
from sandboxes.local.runners import ExitCallback, RunnerPool

log = logging.getLogger(__name__)

INIT_SCRIPT = Path(__file__).with_name("sandbox-init.sh")
TMUX_CONF = Path(__file__).with_name("sandbox-tmux.conf")
#: Unprivileged users for the screen server, the browser (and whatever else runs in a
#: sandbox) and the socket forwarders: the browser user must not be able to replace the
#: CDP socket that Namek dials (with a symlink to another sandbox's, say).
SCREEN_UID = 61000
USER_UID = 61001
FORWARDER_UID = 61002
#: Ports inside a sandbox's own network namespace (with isolation on).
CDP_PORT = 9222
DISPLAY_NUM = 1
#: Marks every sandbox process, so that a restarted supervisor finds leftovers.
MARKER = "NAMEK_SANDBOX_OF"
PASSWORD_ALPHABET = string.ascii_letters + string.digits


class SupervisorError(Exception):
    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class LocalSandbox:
    #: the Namek sandbox id; None while the sandbox waits in the warm pool
    id: int | None
    #: the directory name when started and the NAMEK_SANDBOX_ID of its processes
    key: str
    name: str
    width: int
    height: int
    start_url: str
    dir: Path
    password: str
    cdp_port: int
    display: int
    phase: str = "starting"
    reason: str = ""
    browser_restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    forwarder: asyncio.AbstractServer | None = None
    deleting: bool = False
    #: why the next Chromium exit happens, when Namek asked for it
    restart_reason: str = ""

    @property
    def vnc_socket(self) -> Path:
        return self.dir / "screen" / "vnc.sock"

    @property
    def cdp_socket(self) -> Path:
        return self.dir / "cdp" / "cdp.sock"

    @property
    def tmux_socket(self) -> Path:
        return self.dir / "tmux" / "tmux.sock"


def describe_exit(code: int) -> str:
    """Bash reports death by signal N as 128+N."""
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name}"
    return f"exited with status {code}"


def isolation_problem() -> str | None:
    """Why bubblewrap cannot isolate sandboxes here, or None when it can."""
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    command = ["bwrap", "--unshare-pid", "--unshare-net", "--ro-bind", "/usr", "/usr"]
    command += ["--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"]
    if os.geteuid() != 0:
        command.append("--unshare-user")
    try:
        result = subprocess.run([*command, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap failed to run: {exc}"
    if result.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {result.stderr.decode(errors='replace').strip()}"
    return None


def sweep_processes(data_dir: Path, key: str | None = None) -> int:
    """SIGKILL every process that carries our marker (for one sandbox's key, or all)."""
    wanted = f"{MARKER}={data_dir}".encode()
    wanted_id = f"NAMEK_SANDBOX_ID={key}".encode() if key is not None else None
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ and (wanted_id is None or wanted_id in environ):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def http_get_unix(path: str, target: str, timeout: float = 2.0, method: str = "GET") -> bytes:
    """A bare HTTP request over a UNIX socket (Chromium's CDP /json endpoints): the body."""

    async def run() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise ValueError(f"HTTP {status.decode(errors='replace')}")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return await reader.readexactly(min(length, 1024 * 1024))
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)


PhaseCallback = Callable[[int, str, str, dict[str, Any]], Any]


class Supervisor:
    def __init__(
        self,
        data_dir: Path,
        socket_path: Path,
        internal_url: str,
        *,
        isolation: bool = True,
        chromium: str = "/usr/bin/chromium",
        start_timeout: float = 30.0,
        on_phase: PhaseCallback | None = None,
        screen_server: str = "xvnc",
        warm_pool: int = 0,
        warm_size: tuple[int, int] = (1280, 800),
        on_runner_exit: ExitCallback | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.sandboxes_dir = data_dir / "sandboxes"
        self.socket_path = socket_path
        self.internal = urlsplit(internal_url)
        self.isolation = isolation
        self.chromium = chromium
        self.start_timeout = start_timeout
        self.on_phase = on_phase
        self.screen_server = screen_server
        self.warm_pool = warm_pool
        self.warm_size = warm_size
        #: unclaimed sandboxes, starting or ready, owned by the supervisor alone
        self.warm: list[LocalSandbox] = []
        self._warm_seq = 0
        self._stopping = False
        self.sandboxes: dict[int, LocalSandbox] = {}
        self.watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.server: asyncio.AbstractServer | None = None
        self._lock_file: Any = None
        self._root = os.geteuid() == 0
        self.runners = RunnerPool(data_dir, MARKER, on_runner_exit)

    # --- start and stop ---------------------------------------------------------------

    def acquire_lock(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = open(self.data_dir / "supervisor.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SupervisorError(
                f"another sandbox supervisor already runs for {self.data_dir} (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def sweep_leftovers(self) -> list[int]:
        """Kill and remove whatever an earlier supervisor left; returns their sandbox ids."""
        killed = sweep_processes(self.data_dir)
        found = []
        if self.sandboxes_dir.exists():
            for entry in self.sandboxes_dir.iterdir():
                if entry.name.isdigit():
                    found.append(int(entry.name))
                shutil.rmtree(entry, ignore_errors=True)
        if killed or found:
            log.warning("removed leftovers of an earlier supervisor: %s processes, sandboxes %s", killed, found)
        return found

    async def start(self) -> None:
        self.acquire_lock()
        self.sweep_leftovers()
        self.sandboxes_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._write_accounts()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path), limit=protocol.MAX_LINE)
        os.chmod(self.socket_path, 0o600)
        log.info(
            "sandbox supervisor listening on %s (isolation %s, %s, warm pool %s)",
            self.socket_path, self.isolation, self.screen_server, self.warm_pool,
        )  # fmt: skip
        self._refill()

    def _write_accounts(self) -> None:
        """/etc/passwd and /etc/group as sandboxes see them: the host's plus our three users,
        so that the shell, tmux and Chromium can name who they run as."""
        etc = self.data_dir / "sandbox-etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        users = (
            ("sandbox", USER_UID, "/sandbox/home", "/bin/bash"),
            ("namek-screen", SCREEN_UID, "/nonexistent", "/usr/sbin/nologin"),
            ("namek-forwarder", FORWARDER_UID, "/nonexistent", "/usr/sbin/nologin"),
        )
        for name, host_file, line in (
            ("passwd", "/etc/passwd", "{0}:x:{1}:{1}:Namek {0}:{2}:{3}\n"),
            ("group", "/etc/group", "{0}:x:{1}:\n"),
        ):
            host = Path(host_file).read_text()
            extra = "".join(line.format(*user) for user in users)
            (etc / name).write_text(host.rstrip("\n") + "\n" + extra)
            (etc / name).chmod(0o644)

    async def stop(self) -> None:
        self._stopping = True
        if self.server:
            self.server.close()
        await self.runners.stop_all()
        await asyncio.gather(
            *(self.delete(sid, reason="Namek stopped", phase="failed") for sid in list(self.sandboxes)),
            *(self._teardown(sandbox) for sandbox in self.warm),
            return_exceptions=True,
        )
        self.warm.clear()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._lock_file:
            self._lock_file.close()

    # --- the socket ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                request = protocol.decode(line)
                op = request.get("op")
                if op == "watch":
                    await self._watch(reader, writer)
                    return
                reply = await self._handle(str(op), request)
            except SupervisorError as exc:
                reply = {"ok": False, "error": str(exc), "retryable": exc.retryable}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}", "retryable": False}
            writer.write(protocol.encode(reply))
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down: a watcher's stream simply ends
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self.watchers.add(queue)
        closed = asyncio.ensure_future(reader.read())  # ends when the watcher goes, or resets
        try:
            writer.write(protocol.encode({"ok": True}))
            while not closed.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    writer.write(protocol.encode(getter.result()))
                    await writer.drain()
                else:
                    getter.cancel()
        except (ConnectionError, OSError):
            pass  # the watcher went mid-write
        finally:
            self.watchers.discard(queue)
            if closed.done() and not closed.cancelled():
                closed.exception()  # a reset watcher is how watching ends, not an error
            closed.cancel()

    async def _handle(self, op: str, request: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911
        if op == "ping":
            return {
                "ok": True,
                "pid": os.getpid(),
                "sandboxes": len(self.sandboxes),
                "isolation": self.isolation,
                "screen_server": self.screen_server,
                "warm": {
                    "wanted": self.warm_pool,
                    "ready": sum(s.phase == "ready" for s in self.warm),
                    "starting": sum(s.phase == "starting" for s in self.warm),
                },
            }
        if op == "list":
            return {"ok": True, "sandboxes": [self._describe(s) for s in self.sandboxes.values()]}
        if op == "run_agent":
            sandbox = self._get(int(request["sandbox"]))
            self._require_ready(sandbox)
            await self.runners.start(
                int(request["run"]),
                int(request["sandbox"]),
                str(request["bridge"]),
                str(request["token"]),
                screen=(str(sandbox.vnc_socket), sandbox.password),
            )
            return {"ok": True}
        if op == "stop_agent":
            self.runners.stop(int(request["run"]), float(request.get("grace", 10)))
            return {"ok": True}
        if op not in ("create", "delete", "status", "screen", "browser", "shell", "restart_browser"):
            raise SupervisorError(f"unknown op {op!r}")
        sandbox_id = int(request["id"])
        if op == "create":
            await self.create(
                sandbox_id,
                str(request["name"]),
                int(request["width"]),
                int(request["height"]),
                str(request["start_url"]),
            )
            return {"ok": True, **self._describe(self.sandboxes[sandbox_id])}
        if op == "delete":
            await self.delete(sandbox_id)
            return {"ok": True}
        sandbox = self._get(sandbox_id)
        if op == "status":
            return {"ok": True, **self._describe(sandbox)}
        if op == "screen":
            self._require_ready(sandbox)
            return {"ok": True, "path": str(sandbox.vnc_socket), "password": sandbox.password}
        if op == "browser":
            self._require_ready(sandbox)
            return {"ok": True, "path": str(sandbox.cdp_socket)}
        if op == "shell":
            self._require_ready(sandbox)
            return {"ok": True, "path": str(sandbox.tmux_socket), "session": "main"}
        if op == "restart_browser":
            await self.restart_browser(sandbox, str(request.get("reason") or "restarted on request"))
            return {"ok": True, **self._describe(sandbox)}
        raise SupervisorError(f"unknown op {op!r}")

    def _get(self, sandbox_id: int) -> LocalSandbox:
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise SupervisorError(f"no local sandbox {sandbox_id}") from None

    @staticmethod
    def _require_ready(sandbox: LocalSandbox) -> None:
        if sandbox.phase != "ready":
            raise SupervisorError(f"sandbox {sandbox.id} is {sandbox.phase}", retryable=sandbox.phase == "starting")

    @staticmethod
    def _describe(sandbox: LocalSandbox) -> dict[str, Any]:
        return {
            "id": sandbox.id,
            "phase": sandbox.phase,
            "reason": sandbox.reason,
            "browser_restarts": sandbox.browser_restarts,
        }

    # --- phases -------------------------------------------------------------------------

    async def _set_phase(self, sandbox: LocalSandbox, phase: str, reason: str = "", **extra: Any) -> None:
        sandbox.phase, sandbox.reason = phase, reason
        log.info("sandbox %s: %s %s", sandbox.key, phase, reason)
        if sandbox.id is not None:  # a warm sandbox is nobody's business yet
            await self._publish(sandbox.id, phase, reason, extra)

    async def _publish(self, sandbox_id: int, phase: str, reason: str, extra: dict[str, Any]) -> None:
        if self.on_phase:
            try:
                result = self.on_phase(sandbox_id, phase, reason, extra)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("recording phase %s of sandbox %s failed", phase, sandbox_id)
        message = {"event": "phase", "id": sandbox_id, "phase": phase, "reason": reason, **extra}
        for queue in list(self.watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(message)

    # --- create ---------------------------------------------------------------------------

    async def create(self, sandbox_id: int, name: str, width: int, height: int, start_url: str) -> None:
        if sandbox_id in self.sandboxes:
            raise SupervisorError(f"sandbox {sandbox_id} exists already")
        if not (0 < width <= 8192 and 0 < height <= 8192):
            raise SupervisorError("bad screen size")
        warm = next((w for w in self.warm if w.phase == "ready" and (w.width, w.height) == (width, height)), None)
        if warm is not None:
            self.warm.remove(warm)
            try:
                await self._claim(warm, sandbox_id, name, start_url)
            finally:
                self._refill()  # after the claim: the replacement's start competes for the CPU
            return
        sandbox = self._new_sandbox(
            str(sandbox_id), sandbox_id, name=name, width=width, height=height, start_url=start_url
        )
        self.sandboxes[sandbox_id] = sandbox
        try:
            await self._launch(sandbox)
        except SupervisorError:
            del self.sandboxes[sandbox_id]
            raise
        await self._set_phase(sandbox, "starting")
        self._watch_start(sandbox)

    def _new_sandbox(
        self, key: str, sandbox_id: int | None, *, name: str, width: int, height: int, start_url: str
    ) -> LocalSandbox:
        return LocalSandbox(
            id=sandbox_id,
            key=key,
            name=name,
            width=width,
            height=height,
            start_url=start_url,
            dir=self.sandboxes_dir / key,
            password="".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(8)),
            cdp_port=CDP_PORT if self.isolation else _free_port(),
            display=DISPLAY_NUM if self.isolation else self._free_display(),
        )

    async def _launch(self, sandbox: LocalSandbox) -> None:
        """Lay out the directory and start the processes. Raises SupervisorError."""
        try:
            self._prepare_dir(sandbox)
            sandbox.forwarder = await self._start_forwarder(sandbox)
            sandbox.process = await asyncio.create_subprocess_exec(
                *self._command(sandbox),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._environment(sandbox),
                start_new_session=True,
            )
        except Exception as exc:
            log.exception("could not start sandbox %s", sandbox.key)
            await self._teardown(sandbox)
            raise SupervisorError(f"could not start the sandbox: {exc}") from None

    def _watch_start(self, sandbox: LocalSandbox) -> None:
        sandbox.tasks.append(asyncio.ensure_future(self._follow(sandbox)))
        sandbox.tasks.append(asyncio.ensure_future(self._await_ready(sandbox)))

    # --- the warm pool --------------------------------------------------------------------

    def _refill(self) -> None:
        """Start warm sandboxes until the pool has its size (ready or on the way)."""
        while not self._stopping and len(self.warm) < self.warm_pool:
            self._warm_seq += 1
            width, height = self.warm_size
            sandbox = self._new_sandbox(
                f"warm-{self._warm_seq}", None, name="warm", width=width, height=height, start_url="about:blank"
            )
            self.warm.append(sandbox)
            sandbox.tasks.append(asyncio.ensure_future(self._start_warm(sandbox)))

    async def _start_warm(self, sandbox: LocalSandbox) -> None:
        try:
            await self._launch(sandbox)
        except SupervisorError:
            self._warm_failed(sandbox)
            return
        self._watch_start(sandbox)

    def _warm_failed(self, sandbox: LocalSandbox) -> None:
        if sandbox in self.warm:
            self.warm.remove(sandbox)
            # Whatever broke it may break the next one too: do not spin.
            asyncio.get_running_loop().call_later(5, self._refill)

    async def _claim(self, sandbox: LocalSandbox, sandbox_id: int, name: str, start_url: str) -> None:
        """A warm sandbox becomes Namek sandbox ``sandbox_id``: ready at once."""
        directory = self.sandboxes_dir / str(sandbox_id)
        # The sandbox's bind mount follows the directory, not its name.
        os.rename(sandbox.dir, directory)
        sandbox.dir, sandbox.id, sandbox.name, sandbox.start_url = directory, sandbox_id, name, start_url
        (directory / "start_url").write_text(start_url)
        self.sandboxes[sandbox_id] = sandbox
        await self._set_phase(sandbox, "starting")
        try:
            await self._open_start_page(sandbox)
        except (TimeoutError, OSError, EOFError, ValueError) as exc:
            await self._fail(sandbox, f"the warm sandbox's browser did not take its start page: {exc}")
            return
        await self._set_phase(sandbox, "ready", warm=True)

    async def _open_start_page(self, sandbox: LocalSandbox) -> None:
        """Open the start page in a new tab and close the others, over CDP."""
        socket_path = str(sandbox.cdp_socket)
        before = json.loads(await http_get_unix(socket_path, "/json/list"))
        created = json.loads(await http_get_unix(socket_path, f"/json/new?{sandbox.start_url}", method="PUT"))
        for target in before:
            if target.get("type") == "page" and target.get("id") != created.get("id"):
                await http_get_unix(socket_path, f"/json/close/{target['id']}")

    # --- restart the browser ----------------------------------------------------------------

    async def restart_browser(self, sandbox: LocalSandbox, reason: str) -> None:
        """Kill Chromium (the init script starts it again) and wait for CDP to answer."""
        self._require_ready(sandbox)
        main = self._chromium_main(sandbox)
        if main is None:
            raise SupervisorError("Chromium is not running (it is being restarted already)", retryable=True)
        sandbox.restart_reason = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(main, signal.SIGKILL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if sandbox.restart_reason:
                continue  # the old Chromium's exit is not reported yet
            with contextlib.suppress(TimeoutError, OSError, EOFError, ValueError):
                if "webSocketDebuggerUrl" in json.loads(await http_get_unix(str(sandbox.cdp_socket), "/json/version")):
                    return
        raise SupervisorError(f"Chromium did not come back within {self.start_timeout:.0f} s", retryable=True)

    @staticmethod
    def _chromium_main(sandbox: LocalSandbox) -> int | None:
        """The host pid of the sandbox's Chromium browser process (not its helpers)."""
        if sandbox.process is None:
            return None
        try:
            family = psutil.Process(sandbox.process.pid).children(recursive=True)
        except psutil.Error:
            return None
        for process in family:
            with contextlib.suppress(psutil.Error):
                cmdline = process.cmdline()
                if cmdline and cmdline[0].endswith("/chromium") and not any(a.startswith("--type=") for a in cmdline):
                    return int(process.pid)
        return None

    def _free_display(self) -> int:
        """Without isolation every sandbox shares the machine's X displays."""
        used = {s.display for s in self.sandboxes.values()}
        for number in range(100, 1000):
            if number not in used and not _display_taken(number):
                return number
        raise SupervisorError("no free X display number", retryable=True)

    def _prepare_dir(self, sandbox: LocalSandbox) -> None:
        shutil.rmtree(sandbox.dir, ignore_errors=True)
        sandbox.dir.mkdir(mode=0o711)
        (sandbox.dir / "logs").mkdir(mode=0o700)  # root's: see sandbox-init.sh
        # tmux: only the browser user (and root, which attaches Namek's clients) gets in.
        owners = {"home": USER_UID, "tmux": USER_UID, "cdp": FORWARDER_UID, "screen": SCREEN_UID}
        for sub, uid in owners.items():
            path = sandbox.dir / sub
            path.mkdir(mode=0o700)
            if self._root and self.isolation:
                os.chown(path, uid, uid)
        password_file = sandbox.dir / "screen" / "passwd"
        password_file.write_bytes(rfb.obfuscate_password(sandbox.password))
        password_file.chmod(0o400)
        if self._root and self.isolation:
            os.chown(password_file, SCREEN_UID, SCREEN_UID)

    async def _start_forwarder(self, sandbox: LocalSandbox) -> asyncio.AbstractServer | None:
        """The sandbox's only way out: a socket that leads to Namek's internal URL."""
        if not self.isolation:
            return None
        host = self.internal.hostname or "127.0.0.1"
        port = self.internal.port or (443 if self.internal.scheme == "https" else 80)

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

        path = sandbox.dir / "namek.sock"
        server = await asyncio.start_unix_server(forward, path=str(path))
        os.chmod(path, 0o666)  # only this sandbox's mount namespace can see the directory
        return server

    def _environment(self, sandbox: LocalSandbox) -> dict[str, str]:
        inside = "/sandbox" if self.isolation else str(sandbox.dir)
        start_url = sandbox.start_url
        forward_port = ""
        if self.isolation:
            forward_port = str(self.internal.port or (443 if self.internal.scheme == "https" else 80))
        as_root = self._root and self.isolation
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "SBX": inside,
            "DISPLAY_NUM": str(sandbox.display),
            "WIDTH": str(sandbox.width),
            "HEIGHT": str(sandbox.height),
            "CDP_PORT": str(sandbox.cdp_port),
            "START_URL": start_url,
            "CHROMIUM": self.chromium,
            "SCREEN_SERVER": self.screen_server,
            "SCREEN_UID": str(SCREEN_UID) if as_root else "",
            "USER_UID": str(USER_UID) if as_root else "",
            "FORWARDER_UID": str(FORWARDER_UID) if as_root else "",
            "FORWARD_PORT": forward_port,
            "TMUX_CONF": "/tmux.conf" if self.isolation else str(TMUX_CONF),
            MARKER: str(self.data_dir),
            "NAMEK_SANDBOX_ID": sandbox.key,
        }

    def _command(self, sandbox: LocalSandbox) -> list[str]:
        if not self.isolation:
            return ["/bin/bash", str(INIT_SCRIPT)]
        command = [
            "bwrap",
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            f"sandbox-{sandbox.key}",
            "--ro-bind",
            "/usr",
            "/usr",
            "--ro-bind",
            "/etc",
            "/etc",
        ]
        for link, target in (("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")):
            command += ["--symlink", target, link]
        command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        command += ["--bind", str(sandbox.dir), "/sandbox", "--ro-bind", str(INIT_SCRIPT), "/init.sh"]
        command += ["--ro-bind", str(TMUX_CONF), "/tmux.conf"]
        for name in ("passwd", "group"):
            command += ["--ro-bind", str(self.data_dir / "sandbox-etc" / name), f"/etc/{name}"]
        if self._root:
            # bwrap run by root keeps every capability unless told otherwise. The init
            # script needs only these, to become the unprivileged users (SETPCAP lets
            # setpriv clear the bounding set); it drops them all when it does.
            command += ["--cap-drop", "ALL"]
            command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        else:
            command += ["--unshare-user"]
        return [*command, "/bin/bash", "/init.sh"]

    async def _follow(self, sandbox: LocalSandbox) -> None:
        """Read the init script's reports until the sandbox's processes end."""
        process = sandbox.process
        assert process and process.stdout and process.stderr
        stderr_task = asyncio.ensure_future(process.stderr.read(65536))
        async for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("NAMEK chromium-exit"):
                if sandbox.deleting:
                    continue
                if sandbox.restart_reason:
                    reason = f"Chromium {sandbox.restart_reason}"
                    sandbox.restart_reason = ""
                else:
                    reason = f"Chromium {describe_exit(int(line.split()[-1]))}; restarted"
                sandbox.browser_restarts += 1
                log.warning("sandbox %s: %s", sandbox.id, reason)
                await self._publish(
                    sandbox.id,
                    sandbox.phase,
                    sandbox.reason,
                    {"browser_exit": reason, "browser_restarts": sandbox.browser_restarts},
                )
            elif line:
                log.debug("sandbox %s: %s", sandbox.id, line)
        code = await process.wait()
        stderr = (await stderr_task).decode(errors="replace").strip()
        if sandbox.deleting:
            return
        reason = f"the sandbox's processes ended ({describe_exit(code)})"
        if stderr:
            reason += f": {stderr[-300:]}"
        await self._fail(sandbox, reason)

    async def _await_ready(self, sandbox: LocalSandbox) -> None:
        """Ready means a real RFB handshake with the password, CDP answering and the shell's
        tmux server listening."""
        deadline = time.monotonic() + self.start_timeout
        last_error = "nothing answered"
        while time.monotonic() < deadline and not sandbox.deleting and sandbox.phase == "starting":
            try:
                await rfb.probe(str(sandbox.vnc_socket), sandbox.password)
                version = json.loads(await http_get_unix(str(sandbox.cdp_socket), "/json/version"))
                if not sandbox.tmux_socket.is_socket():
                    raise OSError("the shell's tmux server is not listening yet")
                if "webSocketDebuggerUrl" in version:
                    await self._set_phase(sandbox, "ready")
                    return
            except (TimeoutError, OSError, EOFError, rfb.RFBError, ValueError, IndexError) as exc:
                # EOFError covers IncompleteReadError; ValueError covers bad JSON and HTTP.
                last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        if sandbox.phase == "starting" and not sandbox.deleting:
            await self._fail(sandbox, f"not ready after {self.start_timeout:.0f} s ({last_error})")

    async def _fail(self, sandbox: LocalSandbox, reason: str) -> None:
        if sandbox.phase == "failed":
            return
        await self._set_phase(sandbox, "failed", reason)
        if sandbox.id is None:
            log.warning("warm sandbox %s failed: %s", sandbox.key, reason)
            self._warm_failed(sandbox)
        await self._teardown(sandbox)

    # --- delete ---------------------------------------------------------------------------

    async def delete(self, sandbox_id: int, reason: str = "", phase: str = "stopped") -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            # Unknown here (e.g. after a restart): make sure nothing of it is left.
            sweep_processes(self.data_dir, str(sandbox_id))
            shutil.rmtree(self.sandboxes_dir / str(sandbox_id), ignore_errors=True)
            return
        sandbox.deleting = True
        await self._teardown(sandbox)
        self.sandboxes.pop(sandbox_id, None)
        if sandbox.phase != "failed" or phase == "failed":
            await self._set_phase(sandbox, phase, reason)

    async def _teardown(self, sandbox: LocalSandbox) -> None:
        """Kill every process of the sandbox (its agent runners too) and remove its directory."""
        sandbox.deleting = True
        if sandbox.id is not None:
            await self.runners.stop_sandbox(sandbox.id)
        current = asyncio.current_task()
        for task in sandbox.tasks:
            if task is not current:
                task.cancel()
        if sandbox.forwarder:
            sandbox.forwarder.close()
        process = sandbox.process
        if process and process.returncode is None:
            # bwrap's --die-with-parent takes the whole PID namespace down with it;
            # without isolation the init script leads its own process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        await asyncio.to_thread(sweep_processes, self.data_dir, sandbox.key)
        await asyncio.to_thread(shutil.rmtree, sandbox.dir, True)


def _display_taken(number: int) -> bool:
    return Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

"""A real Namek for tests: the sandbox supervisor and Daphne as subprocesses.

Each instance has its own data dir (SQLite, sandboxes, sockets) and a free port, and
its ``stop()`` checks that nothing of its sandboxes is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from namek_web.serve import daphne_command

ROOT = Path(__file__).resolve().parent.parent
MARKER = "NAMEK_SANDBOX_OF"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_with(variable: str) -> list[int]:
    """Pids of processes whose environment holds ``variable`` (``NAME=value``)."""
    wanted = variable.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def marked_processes(data_dir: Path) -> list[int]:
    """Pids of processes started for sandboxes (and agent runs) of this data dir."""
    return processes_with(f"{MARKER}={data_dir}")


class LiveNamek:
    def __init__(self, base: Path, **env: str) -> None:
        self.data_dir = (base / "data").resolve()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "NAMEK_DATA_DIR": str(self.data_dir),
            "NAMEK_BIND": f"127.0.0.1:{self.port}",
            "NAMEK_LOG_LEVEL": "WARNING",
            # No warm pool unless a test asks: a claimed warm sandbox's processes carry
            # its warm key, and tests find a sandbox's processes by its id.
            "NAMEK_WARM_POOL": "0",
            **env,
        }
        for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "NAMEK_SUPERVISOR_SOCKET"):
            if name not in env:
                self.env.pop(name, None)
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.daphne: subprocess.Popen[bytes] | None = None
        self.cast: dict[str, Any] = {}
        self.logs = base / "logs"
        self.logs.mkdir(exist_ok=True)
        self._log_files: list[Any] = []

    def _log(self, name: str) -> Any:
        handle = open(self.logs / name, "ab")
        self._log_files.append(handle)
        return handle

    # --- processes ----------------------------------------------------------------------

    def manage(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def start(self) -> LiveNamek:
        self.manage("migrate", "--noinput", "-v", "0")
        out = self.manage("shell", "-c", "from tests.cast import print_cast; print_cast()").stdout
        self.cast = json.loads(next(line for line in out.splitlines() if line.startswith("CAST "))[5:])
        self.start_supervisor()
        self.daphne = self.start_daphne(self.port)
        self._wait(lambda: self._http_ok("/login/"), "Daphne")
        return self

    def start_daphne(self, port: int) -> subprocess.Popen[bytes]:
        """A Daphne on ``port`` with this Namek's environment (data dir, supervisor socket),
        not yet answering; ``start()``'s is stopped by ``stop()``, any other by its caller."""
        return subprocess.Popen(
            daphne_command("127.0.0.1", port),
            env=self.env,
            cwd=ROOT,
            stdout=self._log("daphne.log" if port == self.port else f"daphne-{port}.log"),
            stderr=subprocess.STDOUT,
        )

    @contextlib.contextmanager
    def second_daphne(self) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
        """Another Daphne process of this Namek, answering: its port and process; stopped
        after the block."""
        port = free_port()
        process = self.start_daphne(port)
        try:
            self._wait(
                lambda: process.poll() is not None or self._http_ok("/login/", f"http://127.0.0.1:{port}"),
                "the second Daphne",
            )
            assert process.poll() is None, f"the second Daphne exited with {process.returncode}"
            yield port, process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def start_supervisor(self) -> subprocess.Popen[bytes]:
        socket_path = self.data_dir / "supervisor.sock"
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self.supervisor = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "namek_supervisor"],
            env=self.env,
            cwd=ROOT,
            stdout=self._log("supervisor.log"),
            stderr=subprocess.STDOUT,
        )
        self._wait(lambda: socket_path.exists() or self.supervisor.poll() is not None, "supervisor")  # type: ignore[union-attr]
        if self.supervisor.poll() is not None:
            raise RuntimeError(f"supervisor exited: {(self.logs / 'supervisor.log').read_text()[-2000:]}")
        return self.supervisor

    def stop(self) -> None:
        for process in (self.daphne, self.supervisor):
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (self.daphne, self.supervisor):
            if process:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for handle in self._log_files:
            handle.close()
        leftovers = marked_processes(self.data_dir)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"sandbox processes left running: {leftovers}"

    def _wait(self, ready: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not come up within {timeout} s")

    def _http_ok(self, path: str, base_url: str | None = None) -> bool:
        try:
            with urllib.request.urlopen((base_url or self.base_url) + path, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # --- the API ------------------------------------------------------------------------

    def token(self, who: str = "owner") -> str:
        return str(self.cast["tokens"][who])

    def api(self, method: str, path: str, who: str = "owner", body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token(who)}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def create_sandbox(self, who: str = "owner", timeout: float = 45, **body: Any) -> dict[str, Any]:
        """Create a sandbox and wait until it is ready."""
        status, sandbox = self.api("POST", "/api/sandboxes", who, body)
        assert status == 201, sandbox
        return self.wait_phase(sandbox["id"], "ready", who, timeout)

    def wait_phase(self, sandbox_id: int, phase: str, who: str = "owner", timeout: float = 45) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        sandbox: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, sandbox = self.api("GET", f"/api/sandboxes/{sandbox_id}", who)
            assert status == 200, sandbox
            if sandbox["phase"] == phase:
                return sandbox
            if sandbox["phase"] in ("failed", "stopped") and phase not in ("failed", "stopped"):
                raise AssertionError(f"sandbox {sandbox_id} is {sandbox['phase']}: {sandbox['failure_reason']}")
            time.sleep(0.2)
        raise AssertionError(f"sandbox {sandbox_id} not {phase} after {timeout} s: {sandbox}")

    def delete_sandbox(self, sandbox_id: int, who: str = "owner") -> dict[str, Any]:
        status, sandbox = self.api("DELETE", f"/api/sandboxes/{sandbox_id}", who)
        assert status == 200, sandbox
        return sandbox

    def sandbox_dir(self, sandbox_id: int) -> Path:
        return self.data_dir / "sandboxes" / str(sandbox_id)

    def screen_target(self, sandbox_id: int) -> tuple[str, str]:
        """(VNC socket path, password), asked from the supervisor as a web process would."""
        from sandboxes.backends.local import LocalBackend

        target = LocalBackend(str(self.data_dir / "supervisor.sock")).screen_target(sandbox_id)
        assert target.endpoint.unix_path
        return target.endpoint.unix_path, target.password

    def browser_socket(self, sandbox_id: int) -> str:
        from sandboxes.backends.local import LocalBackend

        path = LocalBackend(str(self.data_dir / "supervisor.sock")).browser_target(sandbox_id).endpoint.unix_path
        assert path
        return path


@contextlib.contextmanager
def running(base: Path, **env: str) -> Iterator[LiveNamek]:
    """A started LiveNamek, stopped (and checked for leftovers) at the end."""
    namek = LiveNamek(base, **env)
    try:
        yield namek.start()
    finally:
        namek.stop()


@contextlib.contextmanager
def ready_sandbox(namek: LiveNamek, who: str = "owner", **body: Any) -> Iterator[dict[str, Any]]:
    """A ready sandbox, deleted at the end."""
    created = namek.create_sandbox(who=who, **body)
    try:
        yield created
    finally:
        namek.delete_sandbox(created["id"], who=who)


class RedisServer:
    """Debian's redis-server on a free port of 127.0.0.1, no persistence, in its own
    session (so that a Ctrl-C to a terminal leaves it to ``stop()``, after Namek)."""

    def __init__(self, base: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.dir = base / "redis"
        self.dir.mkdir(exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> RedisServer:
        self._log = open(self.dir / "redis.log", "ab")
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer within 10 s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def redis_server(base: Path, password: str | None = None) -> Iterator[RedisServer]:
    """A RedisServer, stopped however the block ends."""
    server = RedisServer(base, password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Debian's PostgreSQL in a throwaway cluster on a free port of 127.0.0.1 (trust
    authentication, no fsync), run as the ``postgres`` user when we are root (it refuses
    root); yields a DATABASE_URL of an empty database, and is stopped however the block
    ends."""
    import glob
    import shutil
    import tempfile

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert binaries, "PostgreSQL's server is not installed (Debian package postgresql)"
    bindir = Path(binaries[-1])
    base = Path(tempfile.mkdtemp(prefix="namek-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    port = free_port()
    data, log = base / "data", base / "postgres.log"

    def run(*argv: str) -> None:
        subprocess.run([*as_postgres, *argv], check=True, capture_output=True, timeout=120, cwd=base)

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "namek", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        started = True
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "namek", "namek")
        yield f"postgres://namek@127.0.0.1:{port}/namek"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)

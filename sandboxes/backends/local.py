"""The local backend: a client of the one supervisor process that owns local sandboxes.

Web processes never spawn sandbox processes; they ask the supervisor
(``manage.py namek_supervisor``) and then dial the sandbox's UNIX sockets themselves.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings

from sandboxes.backends.base import (
    BackendError,
    BrowserTarget,
    Endpoint,
    RunnerSpec,
    SandboxBackend,
    SandboxSpec,
    SandboxStatus,
    ScreenTarget,
)
from sandboxes.local import protocol

UNREACHABLE = "the sandbox supervisor is not running (start Namek with `make run`)"


class LocalBackend(SandboxBackend):
    name = "local"

    def __init__(self, socket_path: str | None = None, timeout: float = 15.0) -> None:
        self.socket_path = str(socket_path or settings.NAMEK_SUPERVISOR_SOCKET)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                sock.sendall(protocol.encode({"op": op, **args}))
                with sock.makefile("rb") as stream:
                    line = stream.readline(protocol.MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError):
            raise BackendError(UNREACHABLE, retryable=True) from None
        except OSError as exc:
            raise BackendError(f"sandbox supervisor: {exc}", retryable=True) from None
        if not line:
            raise BackendError("the sandbox supervisor closed the connection", retryable=True)
        reply = protocol.decode(line)
        if not reply.get("ok"):
            raise BackendError(reply.get("error", "unknown error"), retryable=bool(reply.get("retryable")))
        return reply

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def create(self, spec: SandboxSpec) -> None:
        self.call("create", id=spec.id, name=spec.name, width=spec.width, height=spec.height, start_url=spec.start_url)

    def status(self, sandbox_id: int) -> SandboxStatus:
        reply = self.call("status", id=sandbox_id)
        return SandboxStatus(reply["phase"], reply.get("reason", ""), reply.get("browser_restarts", 0))

    def delete(self, sandbox_id: int) -> None:
        self.call("delete", id=sandbox_id)

    def screen_target(self, sandbox_id: int) -> ScreenTarget:
        reply = self.call("screen", id=sandbox_id)
        return ScreenTarget(Endpoint(unix_path=reply["path"]), reply["password"])

    def browser_target(self, sandbox_id: int) -> BrowserTarget:
        reply = self.call("browser", id=sandbox_id)
        return BrowserTarget(Endpoint(unix_path=reply["path"]))

    def restart_browser(self, sandbox_id: int, reason: str) -> None:
        self.call("restart_browser", id=sandbox_id, reason=reason)

    def check(self) -> None:
        self.ping()

    def open_shell(self, sandbox_id: int, *, readonly: bool = False) -> list[str]:
        """A tmux client for the sandbox's tmux server (root may attach to any user's)."""
        reply = self.call("shell", id=sandbox_id)
        command = ["tmux", "-u", "-S", str(reply["path"]), "attach-session", "-t", str(reply["session"])]
        if readonly:
            # A read-only client must not shrink the shared window to its own size either.
            command += ["-f", "read-only,ignore-size"]
        return command

    def start_runner(self, spec: RunnerSpec) -> None:
        self.call("run_agent", run=spec.run_id, sandbox=spec.sandbox_id, bridge=spec.bridge_url, token=spec.token)

    def stop_runner(self, run_id: int, grace: float) -> None:
        self.call("stop_agent", run=run_id, grace=grace)

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Phase changes as the supervisor makes them, until the connection drops."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=protocol.MAX_LINE)
        except OSError:
            raise BackendError(UNREACHABLE, retryable=True) from None
        try:
            writer.write(protocol.encode({"op": "watch"}))
            await writer.drain()
            while line := await reader.readline():
                message = protocol.decode(line)
                if message.get("event"):
                    yield message
        finally:
            writer.close()

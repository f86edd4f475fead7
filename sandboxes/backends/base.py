"""The one narrow interface every sandbox backend implements.

Backends only touch the outside world (processes, a cluster); the database belongs to
``sandboxes.services``. Every failure is a ``BackendError`` that says whether retrying
can help.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


class BackendError(Exception):
    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SandboxSpec:
    id: int
    name: str
    width: int
    height: int
    start_url: str


@dataclass(frozen=True)
class Endpoint:
    """Where a sandbox service listens: a UNIX socket path, or a host and port."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    def describe(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ScreenTarget:
    endpoint: Endpoint
    #: the VNC password: server side only, never sent to a browser
    password: str


@dataclass(frozen=True)
class BrowserTarget:
    """Chromium's DevTools protocol (HTTP + websocket)."""

    endpoint: Endpoint


@dataclass(frozen=True)
class RunnerSpec:
    """An agent runner to launch: it speaks only the agent bridge, at ``bridge_url``,
    authenticated with ``token`` (kept out of argv: it travels in the environment)."""

    run_id: int
    sandbox_id: int
    token: str = field(repr=False)
    bridge_url: str


@dataclass(frozen=True)
class SandboxStatus:
    phase: str
    reason: str = ""
    browser_restarts: int = 0


class SandboxBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> None:
        """Start creating the sandbox; returns once it is under way."""

    @abc.abstractmethod
    def status(self, sandbox_id: int) -> SandboxStatus: ...

    @abc.abstractmethod
    def delete(self, sandbox_id: int) -> None:
        """Stop the sandbox and remove everything it had; returns once it is gone."""

    @abc.abstractmethod
    def screen_target(self, sandbox_id: int) -> ScreenTarget: ...

    @abc.abstractmethod
    def browser_target(self, sandbox_id: int) -> BrowserTarget: ...

    @abc.abstractmethod
    def restart_browser(self, sandbox_id: int, reason: str) -> None:
        """Restart the sandbox's Chromium; returns once CDP answers again."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BackendError if the backend cannot serve (for /readyz)."""

    @abc.abstractmethod
    def open_shell(self, sandbox_id: int, *, readonly: bool = False) -> list[str]:
        """The command (argv) that attaches a terminal to the sandbox's one shared shell.

        The caller runs it in a PTY of its own (``viewer.terminal``), one per viewer, with
        ``TERM`` set; it ends when the viewer leaves or the sandbox goes. ``readonly``
        clients see the shell but cannot type into it or resize it.
        """

    @abc.abstractmethod
    def start_runner(self, spec: RunnerSpec) -> None:
        """Launch the agent runner of a run, supervised: its exit is reported to
        ``sandboxes.runs.runner_exited``, and it is stopped with its sandbox."""

    @abc.abstractmethod
    def stop_runner(self, run_id: int, grace: float) -> None:
        """Make sure the run's runner ends: terminate it now, kill it after ``grace``
        seconds. Returns at once; stopping a runner that already ended is not an error."""

"""Attach a terminal to a command in a pod over ``pods/exec``: the shell of a Kubernetes sandbox.

Run as::

    python -m sandboxes.backends.kube_exec --namespace NS --pod POD --container C
        (--kubeconfig PATH | --in-cluster --api-server https://HOST:PORT) -- COMMAND [ARG...]

``viewer.terminal`` runs it in a PTY of its own, one per viewer (``KubernetesBackend.open_shell``
gives the argv), with a fixed environment that has none of Namek's variables: so what it
needs to reach the API server comes as arguments. In a cluster that is ``--api-server``,
because the in-cluster configuration otherwise reads ``KUBERNETES_SERVICE_HOST/PORT``; the
service account's token and CA are files, read as usual.

It opens the exec with a TTY (stdin and stdout; a TTY has no separate stderr), puts its own
stdin (the PTY) in raw mode, copies PTY → exec stdin and exec stdout → PTY, and sends the
PTY's size at start and on every SIGWINCH as a resize message (channel 4,
``{"Width": cols, "Height": rows}``). When the remote command ends it exits with its exit
status (channel 3); on SIGHUP, SIGTERM or SIGINT it ends the exec by closing the websocket
and exits with 128 + the signal. If the exec cannot be opened it writes why to the terminal
and exits with 1.

No Django here: only ``kubernetes``, imported when a stream is opened. ``ExecSession`` takes
any object with the ``ExecStream`` methods, so a test can run it against a fake in a real PTY.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
#: bytes read from the PTY at a time
CHUNK = 16 * 1024
#: how long one wait for input lasts when nothing happens (signals wake it at once)
POLL_INTERVAL = 1.0
#: exit status when the terminal (the PTY's other end) is gone
TERMINAL_GONE = 128 + signal.SIGHUP


class ExecStream(Protocol):
    """The part of an exec websocket the copy loop uses (``WebSocketStream`` wraps the client's)."""

    def fileno(self) -> int: ...

    def pending(self) -> bool:
        """Whether input is buffered where ``select`` cannot see it (TLS)."""
        ...

    def is_open(self) -> bool: ...

    def update(self, timeout: float = 0) -> None:
        """Read at most one frame into the channel buffers, waiting up to ``timeout`` for one."""
        ...

    def read_channel(self, channel: int) -> bytes: ...

    def write_channel(self, channel: int, data: bytes) -> None: ...

    def close(self) -> None: ...


class WebSocketStream:
    """``ExecStream`` over the kubernetes client's ``WSClient`` (opened with ``binary=True``).

    A connection that dies without a close frame makes the client raise from any read or
    write: here that only marks the stream closed, and the exit status is then unknown."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.broken = False

    def _socket(self) -> Any:
        return self.client.sock.sock

    def fileno(self) -> int:
        return int(self._socket().fileno())

    def pending(self) -> bool:
        pending = getattr(self._socket(), "pending", None)
        return bool(pending()) if pending else False

    def is_open(self) -> bool:
        return not self.broken and bool(self.client.is_open())

    def update(self, timeout: float = 0) -> None:
        try:
            self.client.update(timeout=timeout)
        except Exception:  # websocket-client and ssl raise several types for a dead connection
            self.broken = True

    def read_channel(self, channel: int) -> bytes:
        try:
            data = self.client.read_channel(channel)
        except Exception:
            self.broken = True
            data = getattr(self.client, "_channels", {}).pop(channel, b"")
        return data.encode() if isinstance(data, str) else bytes(data)

    def write_channel(self, channel: int, data: bytes) -> None:
        try:
            self.client.write_channel(channel, data)
        except Exception:
            self.broken = True

    def close_stdin(self) -> None:
        """Close stdin (the v5 protocol can; v4 cannot, and then this does nothing)."""
        self.client.close_channel(STDIN)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead socket may fail; it is gone either way
            self.client.close()


def exit_status(payload: bytes | str) -> tuple[int, str]:
    """The exit code and a description from an exec's status message (channel 3).

    The API server sends a ``metav1.Status``: ``Success``, or ``Failure`` with reason
    ``NonZeroExitCode`` and the code in ``details.causes``; anything else (no message at
    all: the connection was lost) is -1 with what is known.
    """
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    if not text.strip():
        return -1, "the exec ended without an exit status (the connection was lost)"
    try:
        status = json.loads(text)
    except ValueError:
        return -1, f"an unreadable exit status: {text[:200]}"
    if not isinstance(status, dict):
        return -1, f"an unreadable exit status: {text[:200]}"
    if status.get("status") == "Success":
        return 0, "exit status 0"
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                with contextlib.suppress(TypeError, ValueError):
                    return describe_code(int(cause.get("message")))
    return -1, str(status.get("message") or "the command failed")


def describe_code(code: int) -> tuple[int, str]:
    if code > 128:
        with contextlib.suppress(ValueError):
            return code, f"exit status {code} (killed by {signal.Signals(code - 128).name})"
    return code, f"exit status {code}"


class ExecSession:
    """Copies between a terminal's file descriptors and an exec stream until one ends.

    ``request_resize`` and ``request_stop`` may be called from signal handlers or other
    threads: they only set a flag and wake the loop through a pipe.
    """

    def __init__(self, stream: ExecStream, stdin_fd: int, stdout_fd: int) -> None:
        self.stream = stream
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._resize = True  # the remote TTY starts at the terminal's size
        self._stop_signal = 0

    def request_resize(self) -> None:
        self._resize = True
        self._wake()

    def request_stop(self, signum: int) -> None:
        self._stop_signal = signum
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def run(self) -> int:
        """Copy until the remote command ends (its exit status) or a stop (128 + signal)."""
        try:
            return self._loop()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _loop(self) -> int:
        while True:
            if self._stop_signal:
                self.stream.close()
                return 128 + self._stop_signal
            if self._resize:
                self._resize = False
                self._send_size()
            if not self.stream.is_open():
                break
            stream_fd = self.stream.fileno()
            timeout = 0 if self.stream.pending() else POLL_INTERVAL
            readable, _, _ = select.select([self.stdin_fd, stream_fd, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 1024)
            if self.stdin_fd in readable:
                try:
                    data = os.read(self.stdin_fd, CHUNK)
                except OSError:  # EIO: the terminal's other end is closed
                    data = b""
                if not data:
                    self.stream.close()
                    return TERMINAL_GONE
                self.stream.write_channel(STDIN, data)
            if stream_fd in readable or self.stream.pending():
                self.stream.update()
                self._copy_output()
        self._copy_output()
        code, _ = exit_status(self.stream.read_channel(ERROR))
        self.stream.close()
        return code if code >= 0 else 1

    def _copy_output(self) -> None:
        for channel in (STDOUT, STDERR):
            data = self.stream.read_channel(channel)
            while data:
                written = os.write(self.stdout_fd, data)
                data = data[written:]

    def _send_size(self) -> None:
        size = terminal_size(self.stdin_fd)
        if size is not None:
            rows, cols = size
            self.stream.write_channel(RESIZE, json.dumps({"Width": cols, "Height": rows}).encode())


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``; None if it is not one or has no size."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (no echo, no line editing: the remote TTY does that)."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:  # not a terminal
        yield
        return
    tty.setraw(fd)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# --- the client side ---------------------------------------------------------------------


def load_configuration(kubeconfig: str = "", api_server: str = "") -> Any:
    """A ``kubernetes.client.Configuration``: from a kubeconfig file, or in-cluster (the
    service account's files; ``api_server`` instead of ``KUBERNETES_SERVICE_HOST/PORT``).

    Raises ``kubernetes.config.ConfigException`` (or OSError) when it cannot be loaded.
    """
    from kubernetes import client, config
    from kubernetes.config import incluster_config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration, persist_config=False)
        return configuration
    environ: Any = os.environ
    if api_server:
        parts = urlsplit(api_server)
        environ = {
            incluster_config.SERVICE_HOST_ENV_NAME: parts.hostname or "",
            incluster_config.SERVICE_PORT_ENV_NAME: str(parts.port or 443),
        }
    incluster_config.InClusterConfigLoader(
        token_filename=incluster_config.SERVICE_TOKEN_FILENAME,
        cert_filename=incluster_config.SERVICE_CERT_FILENAME,
        environ=environ,
    ).load_and_set(configuration)
    return configuration


def open_exec(
    configuration: Any, namespace: str, pod: str, container: str, command: list[str], *, tty: bool, stdin: bool
) -> WebSocketStream:
    """Open ``pods/exec``. Raises ``kubernetes.client.ApiException`` (status 0 and the
    handshake's answer when the websocket is refused)."""
    from kubernetes import client
    from kubernetes.stream import stream

    # An ApiClient of its own: ``stream`` swaps its request method while it connects, which
    # would misroute any other call made through the same client meanwhile.
    api = client.CoreV1Api(client.ApiClient(configuration))
    try:
        websocket = stream(
            api.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            container=container,
            command=command,
            stdin=stdin,
            stdout=True,
            stderr=not tty,
            tty=tty,
            _preload_content=False,
            binary=True,
        )
    except AttributeError as exc:
        # The client turns a failed websocket into ApiException(status=0) without a body,
        # then fails to decode that body: the ApiException is the real error.
        if isinstance(exc.__context__, client.ApiException):
            raise exc.__context__ from None
        raise
    return WebSocketStream(websocket)


def describe_error(exc: BaseException) -> str:
    reason = str(getattr(exc, "reason", "") or exc)
    status = getattr(exc, "status", None)
    if status == 0 or status is None:
        for code, meaning in (
            ("401", "the API server did not accept the credentials"),
            ("403", "forbidden (the service account may not create pods/exec here)"),
            ("404", "no such pod or container"),
        ):
            if f"status {code}" in reason:
                return meaning
        return f"the exec websocket failed: {' '.join(reason.split())[:300]}"
    return " ".join(reason.split())[:300]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kube_exec", description="Attach this terminal to a command in a pod.")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--container", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--kubeconfig", help="a kubeconfig file")
    where.add_argument("--in-cluster", action="store_true", help="the service account's token and CA")
    parser.add_argument("--api-server", default="", help="https://HOST:PORT of the API server (with --in-cluster)")
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configuration = load_configuration(args.kubeconfig or "", args.api_server)
        stream = open_exec(configuration, args.namespace, args.pod, args.container, args.command, tty=True, stdin=True)
    except Exception as exc:  # the client raises many types (ApiException, ConfigException, OSError...)
        sys.stderr.write(f"\r\nnamek: cannot attach to {args.pod} ({args.container}): {describe_error(exc)}\r\n")
        sys.stderr.flush()
        return 1
    session = ExecSession(stream, sys.stdin.fileno(), sys.stdout.fileno())
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: session.request_stop(number))
    signal.signal(signal.SIGWINCH, lambda number, frame: session.request_resize())
    with raw_mode(sys.stdin.fileno()):
        return session.run()


if __name__ == "__main__":
    sys.exit(main())

"""Screen recording of an agent run: a small RFB client that feeds ffmpeg.

Run as::

    python -m sandboxes.recording --screen unix:/path/vnc.sock | tcp:HOST:PORT
        --password-file FILE|- --out screen.webm [--fps 5] [--max-bytes N] [--max-seconds N]
        [--connect-timeout S] [--ffmpeg /usr/bin/ffmpeg]

It connects to the VNC server as a shared client (nobody is disconnected), asks for 32-bit
true colour in the Raw and CopyRect encodings, and keeps a framebuffer up to date with
incremental update requests paced at ``--fps``. Whenever the framebuffer changed, at most
``--fps`` times a second, it writes it into ``ffmpeg`` (``-f rawvideo -pix_fmt bgr0``),
which stamps each frame with the time it reads it (``-use_wallclock_as_timestamps``) and
encodes VP8 into a WebM file with those times (a variable frame rate; every browser plays
it). So a still screen costs nothing, a busy machine loses frames rather than time, and
second N of the video is second N after ``started_at`` in the sidecar ``<out>.json``
(``{"started_at": epoch seconds of the first frame, "fps", "width", "height", "frames",
"ended_at", "reason", "bytes"}``), which is how a replay lines the video up with its
timeline.

Bounds: the file stays under ``--max-bytes`` (ffmpeg's ``-fs``, with room for the trailer)
and the recording under ``--max-seconds``. It stops cleanly — ffmpeg finishes the file —
on SIGTERM or SIGINT, at a bound, or when the screen goes away. ffmpeg dies with the
recorder (PR_SET_PDEATHSIG), whatever kills it.

The VNC password comes from a file, or from stdin with ``--password-file -``; never from
argv, which every local user can read. No Django here: the local supervisor launches it
beside each run's agent runner (``sandboxes.local.runners``).

Exit codes: 0 a recording was written; 1 the screen could not be reached or spoke no RFB
we accept (nothing written, no ffmpeg started); 2 bad arguments; 3 ffmpeg is missing or
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxes import rfb

#: frames per second at most written into the video (only when the screen changed)
FPS = 5
#: the largest recording file (NAMEK's supervisor passes this unless told otherwise)
MAX_BYTES = 50 * 1024 * 1024
#: the longest recording, in seconds
MAX_SECONDS = 2 * 60 * 60
#: seconds to connect and finish the RFB handshake
CONNECT_TIMEOUT = 10.0
#: seconds ffmpeg has to finish the file once its input ends
FINISH_TIMEOUT = 20.0
#: wider screens are scaled down to this width in the video
MAX_VIDEO_WIDTH = 1920
#: WebM clusters are buffered whole before they are written: keep them small, so that the
#: size limit is overshot by little
CLUSTER_BYTES = 256 * 1024
FFMPEG = "/usr/bin/ffmpeg"

ENCODING_RAW = 0
ENCODING_COPY_RECT = 1
PR_SET_PDEATHSIG = 1

EXIT_OK, EXIT_SCREEN, EXIT_USAGE, EXIT_FFMPEG = 0, 1, 2, 3


class RecordingError(Exception):
    """The recording cannot go on; ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class ScreenAddress:
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"tcp:{self.host}:{self.port}"


def parse_screen(value: str) -> ScreenAddress:
    """``unix:/path`` or ``tcp:host:port`` (an IPv6 host in brackets)."""
    if value.startswith("unix:") and len(value) > 5:
        return ScreenAddress(unix_path=value[5:])
    if value.startswith("tcp:"):
        host, _, port = value[4:].rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ScreenAddress(host=host, port=int(port))
    raise argparse.ArgumentTypeError(f"{value!r}: give unix:/path/to/socket or tcp:host:port")


class Framebuffer:
    """The remote screen as BGRX bytes, changed by Raw and CopyRect rectangles."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.data = bytearray(width * height * 4)

    def _check(self, x: int, y: int, w: int, h: int) -> None:
        if x + w > self.width or y + h > self.height:
            raise rfb.RFBError(f"rectangle {w}x{h}+{x}+{y} outside the {self.width}x{self.height} screen")

    def put(self, x: int, y: int, w: int, h: int, pixels: bytes) -> None:
        self._check(x, y, w, h)
        row_bytes, stride = w * 4, self.width * 4
        if x == 0 and w == self.width:
            self.data[y * stride : (y + h) * stride] = pixels
            return
        view = memoryview(pixels)
        for row in range(h):
            start = (y + row) * stride + x * 4
            self.data[start : start + row_bytes] = view[row * row_bytes : (row + 1) * row_bytes]

    def region(self, x: int, y: int, w: int, h: int) -> bytes:
        self._check(x, y, w, h)
        stride = self.width * 4
        return b"".join(bytes(self.data[(y + r) * stride + x * 4 : (y + r) * stride + (x + w) * 4]) for r in range(h))

    def copy_rect(self, x: int, y: int, w: int, h: int, *, source: tuple[int, int]) -> None:
        self.put(x, y, w, h, self.region(source[0], source[1], w, h))


class ScreenClient:
    """One shared RFB connection keeping a Framebuffer current."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, width: int, height: int) -> None:
        self.reader, self.writer = reader, writer
        self.frame = Framebuffer(width, height)
        self.updates = 0
        #: grows with every update that changed something
        self.version = 0
        self.updated = asyncio.Event()

    def start(self) -> None:
        """Ask for our pixel format and encodings, and a first full update."""
        # 32 bpp, depth 24, little-endian, true colour, 255 each, shifts 16/8/0: BGRX in memory
        self.writer.write(
            struct.pack(">BxxxBBBBHHHBBBxxx", rfb.MSG_SET_PIXEL_FORMAT, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        )
        self.writer.write(struct.pack(">BxHii", rfb.MSG_SET_ENCODINGS, 2, ENCODING_COPY_RECT, ENCODING_RAW))
        self.request(incremental=False)

    def request(self, *, incremental: bool = True) -> None:
        frame = self.frame
        self.writer.write(
            struct.pack(">BBHHHH", rfb.MSG_FB_UPDATE_REQUEST, int(incremental), 0, 0, frame.width, frame.height)
        )

    async def read_forever(self) -> None:
        """Apply the server's updates until the connection ends (IncompleteReadError)."""
        read = self.reader.readexactly
        while True:
            (kind,) = await read(1)
            if kind == 0:  # FramebufferUpdate
                (count,) = struct.unpack(">xH", await read(3))
                for _ in range(count):
                    x, y, w, h, encoding = struct.unpack(">HHHHi", await read(12))
                    if encoding == ENCODING_RAW:
                        self.frame.put(x, y, w, h, await read(w * h * 4))
                    elif encoding == ENCODING_COPY_RECT:
                        src_x, src_y = struct.unpack(">HH", await read(4))
                        self.frame.copy_rect(x, y, w, h, source=(src_x, src_y))
                    else:
                        raise rfb.RFBError(f"the server sent encoding {encoding}, which was not asked for")
                self.updates += 1
                self.version += count > 0
                self.updated.set()
            elif kind == 1:  # SetColourMapEntries (not with true colour, but harmless)
                _, _, entries = struct.unpack(">BHH", await read(5))
                await read(entries * 6)
            elif kind == 2:  # Bell
                continue
            elif kind == 3:  # ServerCutText
                (length,) = struct.unpack(">xxxi", await read(7))
                await read(abs(length))  # negative: the extended clipboard format
            else:
                raise rfb.RFBError(f"unexpected server message {kind}")

    async def pace_requests(self, fps: int) -> None:
        """Incremental requests, one at a time, at most one per frame interval (the first
        full update has come already)."""
        interval = 1 / fps
        while True:
            asked = time.monotonic()
            self.updated.clear()
            self.request()
            await self.writer.drain()
            await self.updated.wait()
            await asyncio.sleep(max(0.0, asked + interval - time.monotonic()))


async def open_screen(address: ScreenAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 1024 * 1024
    if address.unix_path:
        return await asyncio.open_unix_connection(address.unix_path, limit=limit)
    return await asyncio.open_connection(address.host, address.port, limit=limit)


async def connect(address: ScreenAddress, password: str, timeout: float) -> ScreenClient:
    """Handshake as a shared client; raises RecordingError (exit 1) with the reason."""

    async def handshake() -> ScreenClient:
        reader, writer = await open_screen(address)
        try:
            await rfb.authenticate(reader, writer, password)
            writer.write(b"\x01")  # ClientInit: shared
            await writer.drain()
            init = await rfb.read_server_init(reader)
        except BaseException:
            writer.close()
            raise
        if not (0 < init.width <= 8192 and 0 < init.height <= 8192):
            writer.close()
            raise rfb.RFBError(f"a {init.width}x{init.height} screen")
        return ScreenClient(reader, writer, init.width, init.height)

    try:
        return await asyncio.wait_for(handshake(), timeout)
    except TimeoutError:
        raise RecordingError(f"the screen at {address} did not answer within {timeout:g} s", EXIT_SCREEN) from None
    except asyncio.IncompleteReadError:
        raise RecordingError(
            f"the screen at {address} closed the connection during the handshake", EXIT_SCREEN
        ) from None
    except (OSError, rfb.RFBError) as exc:
        raise RecordingError(f"cannot record the screen at {address}: {exc}", EXIT_SCREEN) from None


def size_limit(max_bytes: int) -> int:
    """ffmpeg's ``-fs``: it stops once a written cluster passes it, then adds the trailer
    (cues): leave room for one cluster and the cues."""
    return max(max_bytes // 2, max_bytes - min(max_bytes // 5, 1024 * 1024))


def ffmpeg_command(ffmpeg: str, size: tuple[int, int], *, fps: int, out: Path, max_bytes: int) -> list[str]:
    width, height = size
    limit = size_limit(max_bytes)
    scale = f"scale=w='trunc(min({MAX_VIDEO_WIDTH},iw)/2)*2':h=-2"
    return [
        ffmpeg, "-hide_banner", "-nostats", "-loglevel", "error",
        # each frame is stamped when ffmpeg reads it, in milliseconds: a variable frame rate
        "-use_wallclock_as_timestamps", "1",
        "-f", "rawvideo", "-pix_fmt", "bgr0", "-s", f"{width}x{height}", "-framerate", "1000", "-i", "-",
        "-an", "-vf", scale, "-pix_fmt", "yuv420p", "-fps_mode", "vfr",
        "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "16", "-static-thresh", "100", "-threads", "2",
        "-b:v", "1M", "-crf", "16", "-qmin", "4", "-qmax", "48", "-g", str(fps * 10), "-auto-alt-ref", "0",
        "-cluster_size_limit", str(CLUSTER_BYTES), "-cluster_time_limit", "1000",
        "-fs", str(limit), "-f", "webm", "-y", str(out),
    ]  # fmt: skip


@dataclass
class Outcome:
    reason: str
    frames: int
    started_at: float | None


def write_sidecar(out: Path, **fields: object) -> None:
    path = out.with_suffix(".json")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(fields))
    os.replace(temporary, path)


async def record(args: argparse.Namespace, password: str) -> int:
    client = await connect(args.screen, password, args.connect_timeout)
    frame = client.frame
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client.start()
    reading = asyncio.ensure_future(client.read_forever())
    pacing: asyncio.Future[None] | None = None
    process: asyncio.subprocess.Process | None = None
    outcome = Outcome("stopped", 0, None)
    try:
        # The first full update, so that the video does not open on a black frame.
        first = asyncio.ensure_future(client.updated.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({first, reading, stopped}, timeout=args.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        stopped.cancel()
        if reading.done():
            reading.result()  # the reason the screen went away
            raise RecordingError(f"the screen at {args.screen} closed before its first frame", EXIT_SCREEN)
        if stop.is_set():
            print("recording: stopped before the first frame", file=sys.stderr)
            return EXIT_OK
        if not client.updates:
            raise RecordingError(
                f"the screen at {args.screen} sent no frame within {args.connect_timeout:g} s", EXIT_SCREEN
            )
        pacing = asyncio.ensure_future(client.pace_requests(args.fps))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = ffmpeg_command(
            args.ffmpeg, (frame.width, frame.height), fps=args.fps, out=args.out, max_bytes=args.max_bytes
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        except OSError as exc:
            raise RecordingError(
                f"cannot run ffmpeg ({args.ffmpeg}): {exc}; install Debian's ffmpeg", EXIT_FFMPEG
            ) from None
        outcome = await feed(args, client, process, reading, stop)
    except (asyncio.IncompleteReadError, ConnectionError, OSError, rfb.RFBError) as exc:
        raise RecordingError(f"cannot record the screen at {args.screen}: {exc}", EXIT_SCREEN) from None
    finally:
        for task in (reading, pacing):
            if task is not None:
                task.cancel()
        client.writer.close()
        if process is not None:
            code = await finish(process)
            if outcome.started_at is not None:
                write_sidecar(
                    args.out,
                    started_at=outcome.started_at,
                    ended_at=time.time(),
                    fps=args.fps,
                    width=frame.width,
                    height=frame.height,
                    frames=outcome.frames,
                    reason=outcome.reason,
                    bytes=args.out.stat().st_size if args.out.exists() else 0,
                    ffmpeg_exit=code,
                )
    size = args.out.stat().st_size if args.out.exists() else 0
    if outcome.reason == "ffmpeg failed" or not size:
        raise RecordingError(f"ffmpeg wrote no video into {args.out} (see its messages above)", EXIT_FFMPEG)
    print(
        f"recording: {outcome.frames} frames over {time.time() - (outcome.started_at or time.time()):.1f} s "
        f"({size} bytes) into {args.out}; "
        f"ended: {outcome.reason}",
        file=sys.stderr,
    )
    return EXIT_OK


async def feed(
    args: argparse.Namespace,
    client: ScreenClient,
    process: asyncio.subprocess.Process,
    reading: asyncio.Future[None],
    stop: asyncio.Event,
) -> Outcome:
    """Write the framebuffer into ffmpeg, at most once a frame interval and only when it
    changed, until a reason to stop; then once more, so that the video lasts until then.

    ffmpeg stamps each frame with the time it reads it (``-use_wallclock_as_timestamps``)
    and the WebM keeps those times: a still screen costs nothing, and when ffmpeg falls
    behind (a busy machine) frames are skipped rather than queued, so the video stays on
    the wall clock.
    """
    assert process.stdin is not None
    stdin = process.stdin
    interval = 1 / args.fps
    origin = time.monotonic()
    outcome = Outcome("stopped", 0, None)
    written = -1  # the framebuffer's version last written
    waiting_for_stop = asyncio.ensure_future(stop.wait())

    async def write() -> bool:
        try:
            stdin.write(bytes(client.frame.data))
            await stdin.drain()
            if outcome.started_at is None:
                # ffmpeg has read the first frame: its time is the video's zero.
                outcome.started_at = time.time()
                write_sidecar(args.out, started_at=outcome.started_at, fps=args.fps, width=client.frame.width,
                              height=client.frame.height)  # fmt: skip
        except (BrokenPipeError, ConnectionResetError):
            size = args.out.stat().st_size if args.out.exists() else 0
            limit_near = size >= size_limit(args.max_bytes) - CLUSTER_BYTES
            outcome.reason = f"the size limit ({args.max_bytes} bytes)" if limit_near else "ffmpeg failed"
            return False
        outcome.frames += 1
        return True

    try:
        tick = origin
        while True:
            if time.monotonic() - origin >= args.max_seconds:
                outcome.reason = f"the time limit ({args.max_seconds:g} s)"
                break
            if reading.done():
                outcome.reason = "the screen went away"
                exc = reading.exception() if not reading.cancelled() else None
                if exc is not None and not isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
                    outcome.reason += f" ({exc})"
                break
            if client.version != written:
                written = client.version
                if not await write():
                    return outcome
            tick = max(tick + interval, time.monotonic())  # never catch up: skip instead
            limit = origin + args.max_seconds
            done, _ = await asyncio.wait(
                {waiting_for_stop, reading}, timeout=max(0.0, min(tick, limit) - time.monotonic())
            )
            if waiting_for_stop in done:
                outcome.reason = "stopped"
                break
        await write()  # the last picture, at the end's time
    finally:
        waiting_for_stop.cancel()
    return outcome


async def finish(process: asyncio.subprocess.Process) -> int:
    """End ffmpeg's input and let it write the file's end; kill it if it does not."""
    if process.stdin is not None:
        with contextlib.suppress(Exception):
            process.stdin.close()
            await process.stdin.wait_closed()
    try:
        return await asyncio.wait_for(process.wait(), FINISH_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


def read_password(source: str) -> str:
    try:
        text = sys.stdin.read(4096) if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"cannot read the password file {source}: {exc}", EXIT_USAGE) from None
    return text.rstrip("\r\n")


def positive(kind: type) -> object:
    def check(value: str) -> object:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be above 0")
        return number

    return check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sandboxes.recording", description="Record a VNC screen into a WebM file with ffmpeg."
    )
    parser.add_argument("--screen", type=parse_screen, required=True, help="unix:/path/to/socket or tcp:host:port")
    parser.add_argument("--password-file", required=True, help="the VNC password's file, or - for stdin")
    parser.add_argument("--out", type=Path, required=True, help="the WebM file to write")
    parser.add_argument("--fps", type=positive(int), default=FPS, help=f"frames per second at most (default {FPS})")
    parser.add_argument("--max-bytes", type=positive(int), default=MAX_BYTES, help="the largest file")
    parser.add_argument("--max-seconds", type=positive(float), default=MAX_SECONDS, help="the longest recording")
    parser.add_argument("--connect-timeout", type=positive(float), default=CONNECT_TIMEOUT)
    parser.add_argument("--ffmpeg", default=FFMPEG, help=f"the ffmpeg binary (default {FFMPEG})")
    args = parser.parse_args(argv)
    if args.fps > 30:
        parser.error("--fps: at most 30")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        password = read_password(args.password_file)
        return asyncio.run(record(args, password))
    except RecordingError as exc:
        print(f"recording: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())

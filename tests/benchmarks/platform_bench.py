"""Sandbox start-up and idle memory per screen server: warm pool claim against a cold start.

Run with ``.venv/bin/python -m tests.benchmarks.platform_bench``.

What it does, in one run:

1. starts two real Nameks (``tests.live.LiveNamek``: supervisor + Daphne), each in its
   own temporary directory with a warm pool of one sandbox (``NAMEK_WARM_POOL=1``), one
   with ``NAMEK_SCREEN=xvnc`` (TigerVNC's Xvnc) and one with ``NAMEK_SCREEN=xvfb-x11vnc``;
2. per repetition and per screen server (the order of the servers, and of warm and cold
   within a server, is rotated per repetition so that drift on this busy machine hits
   all alike) it times **create → first frame** twice:

   * ``warm``: with the pool holding a ready sandbox of the default screen size (and
     nothing starting), ``POST /api/sandboxes`` without a screen size: the supervisor
     claims the pool's sandbox;
   * ``cold``: ``POST /api/sandboxes`` with ``{"screen": "1280x720"}``, a size the pool
     does not hold, so the sandbox starts from scratch (bubblewrap, screen server,
     Chromium). Before a cold run the pool is full and has been quiet for a second, so
     that its refill does not compete with the cold start.

   The clock starts before the POST. The client then polls ``GET /api/sandboxes/<id>``
   every ``--poll`` seconds (as a client would; a warm POST answers ``ready`` already, so
   there is no poll) until the phase is ``ready``, asks the supervisor for the VNC
   socket and password (as the screen relay does), connects, runs the RFB handshake with
   VncAuth, sends SetPixelFormat (32 bpp), SetEncodings (Raw only) and one
   non-incremental full-screen FramebufferUpdateRequest. **create → first frame** is the
   time until the first byte of the FramebufferUpdate is read; the whole update is read
   too (its pixels are sampled: the share of non-black pixels and the number of distinct
   colours tell a painted Chromium from a bare X root or an unpainted window). Then, on
   the same connection, incremental requests follow until a pixel below Chromium's bars
   shows the sandbox's banner colour: **start page on screen**, what a person waits for.
   Intermediate times (POST answered, ready seen, VNC greeting, handshake done, update
   complete) go into a second table and the JSON;
3. **idle memory**: both sandboxes of the repetition are kept, untouched, until each has
   been left alone (no client) for at least ``--idle`` seconds (the pool's refill done
   meanwhile); then
   PSS is summed over each sandbox's process tree (its ``bwrap`` process, a child of the
   supervisor, and everything below it) and split into the screen server (Xvnc, or Xvfb
   + x11vnc), the Chromium family and the rest (bwrap, bash, socat, ...). USS (pages
   no other process maps) is reported too: PSS divides shared pages among all processes
   that map them, so it falls when more Chromiums run on the machine (the pool's, the
   other sandbox's, other people's); USS does not. The pool's idle sandbox is measured
   alike (what holding the pool costs). The sandboxes are deleted after that.

The table shows medians over ``--runs`` repetitions (memory: over every idle sandbox, warm
and cold, i.e. 2 x runs). The baseline for ``warm`` is the cold start on the same server in
the same run. Results are also written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sandboxes import rfb
from tests.benchmarks import cli
from tests.live import LiveNamek

SERVERS = ("xvnc", "xvfb-x11vnc")
KINDS = ("warm", "cold")
#: a screen size the pool (NAMEK_SCREEN_SIZE's default, 1280x800) does not hold
COLD_SCREEN = "1280x720"
MIB = 1024 * 1024

SCREEN_PROCESSES = ("Xvnc", "Xvfb", "x11vnc")
CATEGORIES = ("screen", "chromium", "rest")

ENCODING_RAW = 0
PSEUDO_DESKTOP_SIZE = -223
PSEUDO_LAST_RECT = -224
PSEUDO_EXTENDED_DESKTOP_SIZE = -308
#: 32 bpp, depth 24, little-endian, true colour, 8 bits per channel (red at bit 16)
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
#: every how many pixels one is sampled for the "is there content" check
SAMPLE_EVERY = 61


# --- one create -> first frame ------------------------------------------------------------


@dataclass
class FrameSample:
    server: str
    kind: str
    run: int
    sandbox_id: int
    screen: str
    #: milliseconds since just before the POST
    post_ms: float
    ready_ms: float
    #: the supervisor answered with the VNC socket and password
    target_ms: float
    #: connected to the VNC socket; the server's ProtocolVersion arrived
    connected_ms: float
    greeted_ms: float
    handshake_ms: float
    first_frame_ms: float
    full_frame_ms: float
    #: start page's banner on screen (None: not within the timeout)
    page_ms: float | None
    polls: int
    width: int
    height: int
    rects: int
    frame_bytes: int
    nonblack: float
    colours: int
    load1: float
    warm_claim: bool | None = None


@dataclass
class FirstFrame:
    connected: float
    greeted: float
    handshake: float
    first_byte: float
    complete: float
    #: when an update showed the start page's banner colour (None: not within the timeout)
    page: float | None
    width: int
    height: int
    rects: int
    frame_bytes: int
    nonblack: float
    colours: int


class ScreenReader:
    """Reads FramebufferUpdates (Raw) from a VNC server, sampling pixels as they pass.

    Keeps the colour of one probe pixel, below Chromium's tab and address bars, where the
    start page shows its banner colour edge to edge.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, width: int, height: int) -> None:
        self.reader, self.writer = reader, writer
        self.width, self.height = width, height
        self.probe = (width // 5, height * 3 // 4)
        self.probe_pixel: bytes | None = None
        self.rects = self.frame_bytes = self.sampled = self.nonblack = 0
        self.colours: set[bytes] = set()

    async def configure(self) -> None:
        self.writer.write(b"\x00\x00\x00\x00" + PIXEL_FORMAT)  # SetPixelFormat
        self.writer.write(struct.pack(">BxHi", 2, 1, ENCODING_RAW))  # SetEncodings: Raw only
        await self.writer.drain()

    async def request(self, incremental: bool) -> None:
        self.writer.write(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))
        await self.writer.drain()

    async def wait_update(self) -> float:
        """Skip other server messages up to a FramebufferUpdate; return when its first byte came."""
        while True:
            (kind,) = await self.reader.readexactly(1)
            if kind == 0:
                return time.perf_counter()
            if kind == 1:  # SetColourMapEntries
                _pad, _first, count = struct.unpack(">BHH", await self.reader.readexactly(5))
                await self.reader.readexactly(6 * count)
            elif kind == 3:  # ServerCutText (negative length: extended clipboard)
                (length,) = struct.unpack(">3xi", await self.reader.readexactly(7))
                await self.reader.readexactly(abs(length))
            elif kind != 2:  # 2 is Bell
                raise rfb.RFBError(f"unexpected server message type {kind}")

    async def read_update(self, sample: bool) -> None:
        """The rest of a FramebufferUpdate whose type byte was read."""
        (count,) = struct.unpack(">xH", await self.reader.readexactly(3))
        done = 0
        while count == 0xFFFF or done < count:
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self.reader.readexactly(12))
            if encoding == PSEUDO_LAST_RECT:
                break
            done += 1
            if encoding == ENCODING_RAW:
                pixels = await self.reader.readexactly(w * h * 4)
                self.rects += sample
                self.frame_bytes += len(pixels) if sample else 0
                px, py = self.probe
                if x <= px < x + w and y <= py < y + h:
                    offset = ((py - y) * w + px - x) * 4
                    self.probe_pixel = pixels[offset : offset + 3]
                if sample:
                    self._sample(pixels)
            elif encoding in (PSEUDO_DESKTOP_SIZE, PSEUDO_EXTENDED_DESKTOP_SIZE):
                if encoding == PSEUDO_EXTENDED_DESKTOP_SIZE:
                    (screens,) = struct.unpack(">B3x", await self.reader.readexactly(4))
                    await self.reader.readexactly(16 * screens)
                self.width, self.height = w, h
                self.probe = (w // 5, h * 3 // 4)
            else:
                raise rfb.RFBError(f"unexpected encoding {encoding} in a {w}x{h} rectangle")

    def _sample(self, pixels: bytes) -> None:
        for offset in range(0, len(pixels), 4 * SAMPLE_EVERY):
            pixel = pixels[offset : offset + 3]
            self.sampled += 1
            self.nonblack += pixel != b"\0\0\0"
            if len(self.colours) < 10_000:
                self.colours.add(pixel)

    def shows(self, banner: bytes) -> bool:
        """Whether the probe pixel has the banner's colour (BGR bytes), give or take a little."""
        return self.probe_pixel is not None and all(
            abs(a - b) <= 8 for a, b in zip(self.probe_pixel, banner, strict=True)
        )


def banner_bgr(colour: str) -> bytes:
    """``#rrggbb`` as the bytes of a pixel in PIXEL_FORMAT (little-endian: blue first)."""
    value = bytes.fromhex(colour.removeprefix("#"))
    return bytes(reversed(value))


async def first_frame(path: str, password: str, banner: str, *, page_timeout: float = 20.0) -> FirstFrame:
    """Handshake, read one non-incremental full-screen update, then wait for the start page.

    The start page is seen when the probe pixel shows the sandbox's banner colour, asked
    for with incremental requests (x11vnc may answer non-incremental ones with a stale
    frame when it has idled).
    """
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=16 * MIB), 10)
    connected = time.perf_counter()
    try:
        # When the server's ProtocolVersion came: the server then waits for ours, so the
        # buffer is empty again and putting the 12 bytes back leaves the stream intact.
        version = await asyncio.wait_for(reader.readexactly(12), 10)
        greeted = time.perf_counter()
        reader.feed_data(version)
        await asyncio.wait_for(rfb.authenticate(reader, writer, password), 10)
        writer.write(b"\x01")  # ClientInit: shared
        await writer.drain()
        init = await asyncio.wait_for(rfb.read_server_init(reader), 10)
        handshake = time.perf_counter()
        screen = ScreenReader(reader, writer, init.width, init.height)
        await screen.configure()
        await screen.request(incremental=False)
        first_byte = await asyncio.wait_for(screen.wait_update(), 20)
        await asyncio.wait_for(screen.read_update(sample=True), 20)
        complete = time.perf_counter()
        first = (screen.width, screen.height, screen.rects, screen.frame_bytes)
        nonblack = screen.nonblack / screen.sampled if screen.sampled else 0.0
        page: float | None = complete
        wanted = banner_bgr(banner)
        deadline = time.perf_counter() + page_timeout
        with contextlib.suppress(TimeoutError):
            while not screen.shows(wanted):
                await screen.request(incremental=True)
                await asyncio.wait_for(screen.wait_update(), max(0.01, deadline - time.perf_counter()))
                await asyncio.wait_for(screen.read_update(sample=False), 20)
                page = time.perf_counter()
        if not screen.shows(wanted):
            page = None
        return FirstFrame(
            connected, greeted, handshake, first_byte, complete, page, *first, nonblack, len(screen.colours)
        )
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def supervisor_backend(namek: LiveNamek) -> Any:
    from sandboxes.backends.local import LocalBackend

    return LocalBackend(str(namek.data_dir / "supervisor.sock"))


def screen_target(namek: LiveNamek, sandbox_id: int, timeout: float = 10.0) -> tuple[str, str]:
    from sandboxes.backends.base import BackendError

    deadline = time.monotonic() + timeout
    while True:
        try:
            target = supervisor_backend(namek).screen_target(sandbox_id)
        except BackendError as exc:
            if not exc.retryable or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        assert target.endpoint.unix_path
        return target.endpoint.unix_path, target.password


def create_to_first_frame(
    namek: LiveNamek,
    loop: asyncio.AbstractEventLoop,
    body: dict[str, Any],
    poll: float,
    *,
    created: list[int],
    timeout: float = 60.0,
) -> tuple[dict[str, float | int], FirstFrame]:
    """POST a sandbox (its id goes to ``created`` at once) and time it up to its first frame."""
    start = time.perf_counter()
    status, sandbox = namek.api("POST", "/api/sandboxes", body=body)
    posted = time.perf_counter()
    if status != 201:
        raise RuntimeError(f"POST /api/sandboxes answered {status}: {sandbox}")
    sandbox_id = int(sandbox["id"])
    created.append(sandbox_id)
    polls = 0
    deadline = start + timeout
    while sandbox["phase"] != "ready":
        if sandbox["phase"] in ("failed", "stopped"):
            raise RuntimeError(f"sandbox {sandbox_id} is {sandbox['phase']}: {sandbox.get('failure_reason')}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"sandbox {sandbox_id} not ready after {timeout:.0f} s: {sandbox}")
        time.sleep(poll)
        polls += 1
        status, sandbox = namek.api("GET", f"/api/sandboxes/{sandbox_id}")
        if status != 200:
            raise RuntimeError(f"GET /api/sandboxes/{sandbox_id} answered {status}: {sandbox}")
    ready = time.perf_counter()
    path, password = screen_target(namek, sandbox_id)
    targeted = time.perf_counter()
    frame = loop.run_until_complete(first_frame(path, password, sandbox["banner_color"]))

    def ms(t: float) -> float:
        return (t - start) * 1000

    times = {
        "post_ms": ms(posted),
        "ready_ms": ms(ready),
        "target_ms": ms(targeted),
        "connected_ms": ms(frame.connected),
        "greeted_ms": ms(frame.greeted),
        "handshake_ms": ms(frame.handshake),
        "first_frame_ms": ms(frame.first_byte),
        "full_frame_ms": ms(frame.complete),
        "page_ms": ms(frame.page) if frame.page is not None else -1.0,
        "polls": polls,
    }
    return times, frame


# --- the pool and the process trees ------------------------------------------------------


def wait_pool(namek: LiveNamek, settle: float, timeout: float = 90.0) -> dict[str, int]:
    """Wait until the warm pool is full of ready sandboxes and nothing starts; then settle."""
    deadline = time.monotonic() + timeout
    warm: dict[str, int] = {}
    while time.monotonic() < deadline:
        warm = supervisor_backend(namek).ping()["warm"]
        if warm["ready"] >= warm["wanted"] and warm["starting"] == 0:
            time.sleep(settle)
            return warm
        time.sleep(0.1)
    raise RuntimeError(f"the warm pool did not fill within {timeout:.0f} s: {warm}")


def sandbox_roots(namek: LiveNamek) -> dict[int, str]:
    """The supervisor's bwrap children: pid -> bwrap's --hostname (sandbox-<key>)."""
    assert namek.supervisor is not None
    roots = {}
    for child in psutil.Process(namek.supervisor.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "bwrap":
                cmdline = child.cmdline()
                hostname = cmdline[cmdline.index("--hostname") + 1] if "--hostname" in cmdline else ""
                roots[child.pid] = hostname
    return roots


def category(process: psutil.Process) -> str:
    name = process.name()
    if name in SCREEN_PROCESSES:
        return "screen"
    if name.startswith("chrom"):  # chromium, chrome_crashpad_handler
        return "chromium"
    with contextlib.suppress(psutil.Error):
        if process.exe().startswith("/usr/lib/chromium/"):
            return "chromium"
    return "rest"


def tree_memory(root_pid: int) -> dict[str, Any]:
    """PSS and USS (MiB) over a sandbox's process tree, split by category."""
    root = psutil.Process(root_pid)
    pss = dict.fromkeys(CATEGORIES, 0.0)
    uss = dict.fromkeys(CATEGORIES, 0.0)
    processes = dict.fromkeys(CATEGORIES, 0)
    names: dict[str, dict[str, int]] = {kind: {} for kind in CATEGORIES}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            kind = category(process)
            info = process.memory_full_info()
            pss[kind] += info.pss / MIB
            uss[kind] += info.uss / MIB
            processes[kind] += 1
            names[kind][process.name()] = names[kind].get(process.name(), 0) + 1
    return {
        "pss_mib": sum(pss.values()),
        "uss_mib": sum(uss.values()),
        "pss_split_mib": pss,
        "uss_split_mib": uss,
        "processes": processes,
        "names": names,
    }


def chromium_browsers_on_machine() -> int:
    """Chromium browser processes (not helpers) running on the whole machine."""
    count = 0
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            process.info["name"] == "chromium"
            and cmdline
            and cmdline[0].endswith("/chromium")
            and not any(a.startswith("--type=") for a in cmdline)
        ):
            count += 1
    return count


# --- the benchmark ------------------------------------------------------------------------


@dataclass
class Held:
    """A measured sandbox kept for the idle-memory figure."""

    kind: str
    sandbox_id: int
    root_pid: int
    hostname: str
    untouched_since: float  # time.monotonic(), when the benchmark's VNC client left


@dataclass
class Results:
    frames: list[FrameSample] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)


def measure_one(
    namek: LiveNamek,
    server: str,
    kind: str,
    *,
    run: int,
    loop: asyncio.AbstractEventLoop,
    args: argparse.Namespace,
    held: list[Held],
) -> FrameSample:
    """One create -> first frame; the sandbox is appended to ``held`` (it is deleted later)."""
    wait_pool(namek, settle=args.settle)
    known = {h.root_pid for h in held}
    before = sandbox_roots(namek)
    body: dict[str, Any] = {"name": f"bench-{kind}-{run}"}
    if kind == "cold":
        body["screen"] = COLD_SCREEN
    load1 = os.getloadavg()[0]
    created: list[int] = []
    try:
        times, frame = create_to_first_frame(namek, loop, body, args.poll, created=created)
    finally:
        # Found and held even when the measurement failed, so that it is deleted.
        after = sandbox_roots(namek)
        if kind == "warm":
            candidates = [pid for pid in before if pid not in known and pid in after]
        else:
            candidates = [pid for pid in after if pid not in before]
        if created:
            root = candidates[0] if len(candidates) == 1 else -1
            held.append(Held(kind, created[0], root, after.get(root, ""), untouched_since=time.monotonic()))
    sandbox_id = created[0]
    hostname = held[-1].hostname
    if held[-1].root_pid == -1:
        raise RuntimeError(f"cannot tell which bwrap is sandbox {sandbox_id}: candidates {candidates}")
    # A claimed warm sandbox keeps its pool key (sandbox-warm-N); a cold one is named by its id.
    warm_claim = hostname.startswith("sandbox-warm-")
    if kind == "cold" and hostname != f"sandbox-{sandbox_id}":
        raise RuntimeError(f"cold sandbox {sandbox_id} runs as {hostname!r}")
    if kind == "warm" and not warm_claim:
        raise RuntimeError(f"warm sandbox {sandbox_id} was not claimed from the pool (runs as {hostname!r})")
    return FrameSample(
        server=server,
        kind=kind,
        run=run,
        sandbox_id=sandbox_id,
        screen=COLD_SCREEN if kind == "cold" else "default",
        post_ms=float(times["post_ms"]),
        ready_ms=float(times["ready_ms"]),
        target_ms=float(times["target_ms"]),
        connected_ms=float(times["connected_ms"]),
        greeted_ms=float(times["greeted_ms"]),
        handshake_ms=float(times["handshake_ms"]),
        first_frame_ms=float(times["first_frame_ms"]),
        full_frame_ms=float(times["full_frame_ms"]),
        page_ms=None if times["page_ms"] < 0 else float(times["page_ms"]),
        polls=int(times["polls"]),
        width=frame.width,
        height=frame.height,
        rects=frame.rects,
        frame_bytes=frame.frame_bytes,
        nonblack=frame.nonblack,
        colours=frame.colours,
        load1=load1,
        warm_claim=warm_claim,
    )


def idle_memory(namek: LiveNamek, server: str, run: int, held: list[Held], idle: float) -> list[dict[str, Any]]:
    """Wait until every held sandbox has idled ``idle`` s, then measure them and the pool's."""
    wait_pool(namek, settle=0)
    youngest = max(h.untouched_since for h in held)
    time.sleep(max(0.0, youngest + idle - time.monotonic()))
    browsers = chromium_browsers_on_machine()
    samples = []
    for sandbox in held:
        samples.append(
            {
                "server": server,
                "run": run,
                "kind": sandbox.kind,
                "sandbox_id": sandbox.sandbox_id,
                "idle_s": time.monotonic() - sandbox.untouched_since,
                "chromium_browsers_on_machine": browsers,
                **tree_memory(sandbox.root_pid),
            }
        )
    held_roots = {h.root_pid for h in held}
    for pid, hostname in sandbox_roots(namek).items():
        if pid not in held_roots:
            samples.append(
                {
                    "server": server,
                    "run": run,
                    "kind": "pool",
                    "sandbox_id": None,
                    "hostname": hostname,
                    "chromium_browsers_on_machine": browsers,
                    **tree_memory(pid),
                }
            )
    return samples


def delete_held(namek: LiveNamek, held: list[Held]) -> None:
    """Delete the held sandboxes; failures are reported, not raised (LiveNamek.stop() sweeps)."""
    while held:
        cli.delete_sandbox(namek, held.pop().sandbox_id)


def measure_all(nameks: dict[str, LiveNamek], args: argparse.Namespace, results: Results) -> None:
    loop = asyncio.new_event_loop()
    held: dict[str, list[Held]] = {server: [] for server in nameks}
    try:
        for run in range(args.runs):
            servers = list(SERVERS[run % len(SERVERS) :] + SERVERS[: run % len(SERVERS)])
            kinds = list(KINDS) if run % 2 else list(reversed(KINDS))
            for server in servers:
                namek = nameks[server]
                try:
                    for kind in kinds:
                        sample = measure_one(namek, server, kind, run=run, loop=loop, args=args, held=held[server])
                        results.frames.append(sample)
                        print(
                            f"run {run + 1}/{args.runs} {server:12} {kind}: first frame "
                            f"{sample.first_frame_ms:7.1f} ms (ready {sample.ready_ms:7.1f} ms, "
                            f"{sample.polls} polls; {sample.width}x{sample.height}, {sample.rects} rects, "
                            f"{sample.nonblack:.0%} non-black, {sample.colours} colours; start page "
                            f"{_fmt(sample.page_ms, '.1f')} ms; load {sample.load1:.1f})",
                            file=sys.stderr,
                            flush=True,
                        )
                    memory = idle_memory(namek, server, run, held[server], args.idle)
                    results.memory.extend(memory)
                    for sample_memory in memory:
                        split = sample_memory["pss_split_mib"]
                        print(
                            f"run {run + 1}/{args.runs} {server:12} {sample_memory['kind']} idle: "
                            f"PSS {sample_memory['pss_mib']:.0f} MiB (screen {split['screen']:.0f}, "
                            f"Chromium {split['chromium']:.0f}, rest {split['rest']:.0f}), "
                            f"USS {sample_memory['uss_mib']:.0f} MiB",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    delete_held(namek, held[server])
    finally:
        for server, namek in nameks.items():
            delete_held(namek, held[server])
        loop.close()


# --- reporting ----------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(results: Results) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for server in SERVERS:
        row: dict[str, Any] = {"server": server}
        for kind in KINDS:
            frames = [f for f in results.frames if (f.server, f.kind) == (server, kind)]
            row[kind] = {
                "runs": len(frames),
                **{
                    key: _median([getattr(f, key) for f in frames])
                    for key in (
                        "post_ms",
                        "ready_ms",
                        "target_ms",
                        "connected_ms",
                        "greeted_ms",
                        "handshake_ms",
                        "first_frame_ms",
                        "full_frame_ms",
                    )
                },
                "page_ms": _median([f.page_ms for f in frames if f.page_ms is not None]),
                "page_not_seen": sum(f.page_ms is None for f in frames),
                "min_first_frame_ms": min((f.first_frame_ms for f in frames), default=None),
                "max_first_frame_ms": max((f.first_frame_ms for f in frames), default=None),
                "nonblack": _median([f.nonblack for f in frames]),
                "colours": _median([float(f.colours) for f in frames]),
            }
        warm, cold = row["warm"]["first_frame_ms"], row["cold"]["first_frame_ms"]
        row["cold_over_warm"] = cold / warm if warm and cold else None
        per_run = []
        for run in {f.run for f in results.frames if f.server == server}:
            pair = {f.kind: f.first_frame_ms for f in results.frames if (f.server, f.run) == (server, run)}
            if len(pair) == 2:
                per_run.append(pair["cold"] / pair["warm"])
        row["cold_over_warm_per_run_median"] = _median(per_run)
        for label, kinds in (
            ("idle", ("warm", "cold")),
            ("idle_warm", ("warm",)),
            ("idle_cold", ("cold",)),
            ("pool", ("pool",)),
        ):
            samples = [m for m in results.memory if m["server"] == server and m["kind"] in kinds]
            row[label] = {
                "samples": len(samples),
                "pss_mib": _median([m["pss_mib"] for m in samples]),
                "uss_mib": _median([m["uss_mib"] for m in samples]),
                "pss_split_mib": {c: _median([m["pss_split_mib"][c] for m in samples]) for c in CATEGORIES},
                "uss_split_mib": {c: _median([m["uss_split_mib"][c] for m in samples]) for c in CATEGORIES},
            }
        summary[server] = row
    return summary


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(result: dict[str, Any]) -> str:
    summary = result["summary"]
    load = result["load_average"]
    lines = [
        f"Platform benchmark: create -> first VNC frame and idle sandbox memory per screen server; median of "
        f"{result['runs']} interleaved runs (memory: of {2 * result['runs']} idle sandboxes, warm-claimed and cold). "
        f"Load average (1 min) {load[0]:.1f} -> {load[1]:.1f} on {result['cpus']} CPUs.",
        f"Baseline for warm: the cold start (screen {COLD_SCREEN}, a size the pool does not hold) on the same "
        "server in the same run. Clock: from just before POST /api/sandboxes to the first byte of the answer to a "
        f"non-incremental full-screen update request (Raw); cold polls the API for ready every {result['poll_s']:g} s "
        "before dialling the VNC socket (a warm POST answers ready). "
        f"Idle: after >= {result['idle_s']:g} s untouched; PSS over bwrap's process tree, MiB.",
        "",
        "| screen server | warm create→first frame ms | cold create→first frame ms | cold/warm "
        "| idle PSS MiB | screen server | Chromium | rest | idle USS MiB | pool sandbox PSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in SERVERS:
        row = summary[server]
        idle = row["idle"]
        split = idle["pss_split_mib"]
        lines.append(
            f"| {server} | {_fmt(row['warm']['first_frame_ms'])} | {_fmt(row['cold']['first_frame_ms'])} "
            f"| {_fmt(row['cold_over_warm'], '.1f')} | {_fmt(idle['pss_mib'])} | {_fmt(split['screen'])} "
            f"| {_fmt(split['chromium'])} | {_fmt(split['rest'])} | {_fmt(idle['uss_mib'])} "
            f"| {_fmt(row['pool']['pss_mib'])} |"
        )
    lines += [
        "",
        "Where the time goes (medians, ms since just before the POST). First frame non-black and colours: share of "
        f"non-black pixels and distinct colours among one pixel in {SAMPLE_EVERY} of the first update (a few colours: "
        "a bare X root or an unpainted window). Start page on screen: the first update (incremental requests after "
        "the first frame) in which a pixel below Chromium's bars has the sandbox's banner colour. VNC greeting: the "
        "server's ProtocolVersion arrived (after the supervisor gave the socket and the client connected).",
        "",
        "| screen server | kind | POST answered | ready seen | VNC greeting | VNC handshake done | first frame byte "
        "| frame complete | first frame min-max | first frame non-black | first frame colours "
        "| start page on screen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in SERVERS:
        for kind in KINDS:
            k = summary[server][kind]
            lines.append(
                f"| {server} | {kind} | {_fmt(k['post_ms'])} | {_fmt(k['ready_ms'])} | {_fmt(k['greeted_ms'])} "
                f"| {_fmt(k['handshake_ms'])} "
                f"| {_fmt(k['first_frame_ms'])} | {_fmt(k['full_frame_ms'])} "
                f"| {_fmt(k['min_first_frame_ms'])}-{_fmt(k['max_first_frame_ms'])} "
                f"| {_fmt(k['nonblack'], '.0%')} | {_fmt(k['colours'])} | {_fmt(k['page_ms'])}"
                + (f" ({k['page_not_seen']} not seen)" if k["page_not_seen"] else "")
                + " |"
            )
    browsers = sorted({m["chromium_browsers_on_machine"] for m in result["memory"]})
    rest = sorted({name for m in result["memory"] for name in m["names"]["rest"]})
    lines += [
        "",
        "Idle memory by kind (median PSS / USS MiB): "
        + "; ".join(
            f"{server}: warm-claimed {_fmt(summary[server]['idle_warm']['pss_mib'])} / "
            f"{_fmt(summary[server]['idle_warm']['uss_mib'])}, cold {_fmt(summary[server]['idle_cold']['pss_mib'])} / "
            f"{_fmt(summary[server]['idle_cold']['uss_mib'])}"
            for server in SERVERS
        )
        + f". Chromium browsers running on the machine while memory was measured: {browsers} "
        "(shared pages are split among them in PSS). Rest: " + ", ".join(rest) + ".",
    ]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


def chromium_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["/usr/bin/chromium", "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    return "unknown"


def run_benchmark(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Set everything up, measure, and tear everything down again (also on errors)."""
    nameks: dict[str, LiveNamek] = {}
    results = Results()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        for server in SERVERS:
            directory = base / server
            directory.mkdir()
            namek = LiveNamek(directory, NAMEK_SCREEN=server, NAMEK_WARM_POOL="1")
            nameks[server] = namek
            print(f"starting Namek ({server}) in {directory} ...", file=sys.stderr, flush=True)
            namek.start()
        for server, namek in nameks.items():
            ping = supervisor_backend(namek).ping()
            if ping["screen_server"] != server or ping["warm"]["wanted"] != 1:
                raise RuntimeError(f"the {server} Namek's supervisor says {ping}")
        measure_all(nameks, args, results)
        load_after = os.getloadavg()[0]
    finally:
        errors = []
        for namek in nameks.values():
            try:
                namek.stop()
            except BaseException as exc:  # stop the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]
    return {
        "runs": args.runs,
        "poll_s": args.poll,
        "idle_s": args.idle,
        "settle_s": args.settle,
        "cold_screen": COLD_SCREEN,
        "chromium": chromium_version(),
        "load_average": [load_before, load_after],
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
        "summary": summarise(results),
        "frames": [asdict(f) for f in results.frames],
        "memory": results.memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--json", default="bench-results/platform.json", help="where to save the results")
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds before memory is measured (10)")
    parser.add_argument("--poll", type=float, default=0.05, help="API poll interval for ready, seconds (0.05)")
    parser.add_argument("--settle", type=float, default=1.0, help="quiet seconds after the pool fills (1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.idle < 0 or args.poll <= 0 or args.settle < 0:
        parser.error("--runs must be at least 1, --poll positive, --idle and --settle not negative")

    return cli.run(args, "namek-platform-bench-", run_benchmark, report)


if __name__ == "__main__":
    sys.exit(main())

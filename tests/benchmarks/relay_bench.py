"""Namek's screen relay against websockify and a direct connection to the VNC server.

Run with ``.venv/bin/python -m tests.benchmarks.relay_bench`` (``make bench``).

What it does, in one run on one sandbox:

1. starts a real Namek (``tests.live.LiveNamek``: supervisor + Daphne) in a temporary
   directory and creates a sandbox;
2. makes the screen busy: over the Chromium DevTools protocol (the sandbox's CDP UNIX
   socket) the page is navigated to a ``data:`` URL whose full-window canvas is redrawn
   on every animation frame (a gradient of shifting hues plus random rectangles), and
   the window is made full screen where Chromium allows it, so incremental updates
   always have content;
3. starts websockify (``--unix-target`` = the sandbox's VNC socket) on a free loopback
   port;
4. measures with one RFB client (``tests.benchmarks.rfbclient``) over three paths:

   * ``relay``: Namek's ``/ws/sandboxes/<id>/screen/`` (security None, acknowledgements
     every 256 KiB received and after each update, as the relay's flow control wants),
   * ``websockify``: websockify 0.13 in front of the same socket (VncAuth),
   * ``direct``: the VNC server's UNIX socket itself (VncAuth), the upper bound;

   for each encoding (Raw only, or Tight only; 32 bpp true colour, no pseudo-encodings)
   and each mode (``full``: non-incremental full-screen requests; ``incremental``:
   incremental full-screen requests). Each run is one connection: handshake, one
   untimed warm-up update, then for ``--seconds`` a FramebufferUpdateRequest is sent as
   soon as the previous update has been read completely (every rectangle parsed; pixel
   data is skipped, not decoded).

Per run: fps = updates / seconds; MB/s = bytes of the updates (10^6 bytes per MB) /
seconds; latency = median time from sending a request to the first bytes of the answer
being available to the client (over a websocket that is the first whole frame). Runs are
interleaved (each repetition goes round every combination and, within it, every path, in
an order rotated per repetition) so that drift on this busy machine hits all paths
alike; the table shows the median over ``--runs`` repetitions. Relay rows carry the
ratio relay/websockify; a relay row more than 10 % worse than websockify on fps, MB/s or
latency is flagged with ``!``. Differences under ~20 % are within this machine's noise.

Also per run, as a figure that load on a shared machine disturbs less than rates do:
the CPU time (user + system) the relaying process spent per MB relayed, Daphne's for
the relay, websockify's and its per-connection child's for websockify. With Tight the
bytes per update depend on what the canvas shows at that moment, so compare fps there
rather than MB/s. Results are also written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import importlib.metadata
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.benchmarks import cli
from tests.benchmarks.rfbclient import (
    ENCODINGS,
    NamekRelayTransport,
    RFBClient,
    RFBProtocolError,
    Transport,
    UnixTransport,
    WebsocketTransport,
)
from tests.live import LiveNamek, free_port

PATHS = ("relay", "websockify", "direct")
MODES = ("full", "incremental")
FLAG_THRESHOLD = 0.10

BUSY_PAGE = """<!doctype html><html><head><title>busy</title><style>
html,body{margin:0;height:100%;overflow:hidden;background:#000}canvas{display:block}
</style></head><body><canvas id=c></canvas><script>
const c = document.getElementById('c'), g = c.getContext('2d');
window.frames_drawn = 0;
function size() { c.width = innerWidth; c.height = innerHeight; }
addEventListener('resize', size); size();
function draw(t) {
  // the same amount of detail in every frame (hues move, geometry does not), so that
  // Tight's compression ratio does not drift with the animation's phase
  const w = c.width, h = c.height, grad = g.createLinearGradient(0, 0, w, h);
  grad.addColorStop(0, `hsl(${(t / 10) % 360},80%,50%)`);
  grad.addColorStop(1, `hsl(${(t / 10 + 180) % 360},80%,50%)`);
  g.fillStyle = grad; g.fillRect(0, 0, w, h);
  for (let i = 0; i < 40; i++) {
    g.fillStyle = `rgb(${Math.random() * 256 | 0},${Math.random() * 256 | 0},${Math.random() * 256 | 0})`;
    g.fillRect(Math.random() * w, Math.random() * h, 20 + Math.random() * 200, 20 + Math.random() * 150);
  }
  window.frames_drawn++;
  requestAnimationFrame(draw);
}
requestAnimationFrame(draw);
</script></body></html>"""


# --- the busy screen (CDP over the sandbox's UNIX socket) --------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("127.0.0.1", timeout=5)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.unix_path)


def cdp_pages(path: str) -> list[dict[str, Any]]:
    connection = UnixHTTPConnection(path)  # HTTP/1.1: Chromium answers 1.0 with nothing
    try:
        connection.request("GET", "/json/list", headers={"Host": "127.0.0.1"})
        response = connection.getresponse()
        return [t for t in json.loads(response.read()) if t.get("type") == "page"]
    finally:
        connection.close()


class CDP:
    def __init__(self, websocket: Any) -> None:
        self.ws = websocket
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        wanted = self.next_id
        await self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 15))
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return dict(message.get("result", {}))


async def make_screen_busy(cdp_socket: str) -> str:
    """Load the animated page; return a description of how busy the screen is."""
    from websockets.asyncio.client import unix_connect

    deadline = time.monotonic() + 30
    pages: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            pages = cdp_pages(cdp_socket)
            if pages:
                break
        await asyncio.sleep(0.3)
    if not pages:
        raise RuntimeError("Chromium shows no page target")
    url = f"ws://127.0.0.1/devtools/page/{pages[0]['id']}"
    async with unix_connect(cdp_socket, url, max_size=None, ping_interval=None) as websocket:
        cdp = CDP(websocket)
        with contextlib.suppress(RuntimeError):  # full screen where the browser allows it
            window = await cdp.call("Browser.getWindowForTarget")
            await cdp.call("Browser.setWindowBounds", windowId=window["windowId"], bounds={"windowState": "fullscreen"})
        await cdp.call("Page.navigate", url="data:text/html;base64," + base64.b64encode(BUSY_PAGE.encode()).decode())
        for _ in range(50):
            await asyncio.sleep(0.2)
            with contextlib.suppress(RuntimeError):
                result = await cdp.call(
                    "Runtime.evaluate",
                    expression="[window.frames_drawn|0, innerWidth, innerHeight]",
                    returnByValue=True,
                )
                frames_a, width, height = result["result"]["value"]
                if frames_a:
                    await asyncio.sleep(1.0)
                    result = await cdp.call("Runtime.evaluate", expression="window.frames_drawn|0", returnByValue=True)
                    frames = result["result"]["value"] - frames_a
                    return f"canvas {width}x{height}, ~{frames:.0f} frames/s drawn"
    raise RuntimeError("the busy page does not animate")


# --- websockify ---------------------------------------------------------------------------


def start_websockify(vnc_socket: str, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "websockify", f"--unix-target={vnc_socket}", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"websockify exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return process, port
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError("websockify did not come up")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """websockify forks a child per connection: stop its whole session (its own group)."""
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Endpoints:
    relay_url: str
    token: str
    websockify_url: str
    vnc_socket: str
    password: str
    #: the processes that relay: Daphne, and websockify (with a child per connection)
    daphne_pid: int
    websockify_pid: int


@dataclass
class Run:
    encoding: str
    mode: str
    path: str
    fps: float
    mbps: float
    latency_ms: float
    #: CPU time of the relaying process per MB relayed (None for the direct path)
    cpu_ms_per_mb: float | None
    updates: int
    bytes: int
    seconds: float


def cpu_seconds(pid: int) -> float:
    """User + system time of a process, its live children and its reaped children."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


async def open_transport(path: str, ends: Endpoints) -> tuple[Transport, str | None]:
    if path == "relay":
        headers = {"Authorization": f"Bearer {ends.token}"}
        relay = await NamekRelayTransport.connect(ends.relay_url, headers)
        return relay, None  # the relay authenticates upstream itself
    if path == "websockify":
        return await WebsocketTransport.connect(ends.websockify_url), ends.password
    return await UnixTransport.connect(ends.vnc_socket), ends.password


async def one_run(path: str, encoding: str, mode: str, seconds: float, ends: Endpoints) -> Run:
    """One connection: handshake, an untimed warm-up update, then ``seconds`` of updates."""
    relayer = {"relay": ends.daphne_pid, "websockify": ends.websockify_pid}.get(path)
    transport, password = await open_transport(path, ends)
    try:
        client = RFBClient(transport, password)
        await asyncio.wait_for(client.handshake(), 10)
        await client.configure(ENCODINGS[encoding])
        # the first update after SetEncodings is a full one anyway
        await client.request(incremental=False)
        await asyncio.wait_for(client.read_update(), 30)
        cpu_before = cpu_seconds(relayer) if relayer else 0.0
        stats = await asyncio.wait_for(client.measure(mode == "incremental", seconds), seconds + 60)
        cpu = cpu_seconds(relayer) - cpu_before if relayer else None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.close(), 5)
    if path == "websockify":  # let its per-connection child exit before the next run
        for _ in range(100):
            if not psutil.Process(ends.websockify_pid).children():
                break
            await asyncio.sleep(0.05)
    return Run(
        encoding=encoding,
        mode=mode,
        path=path,
        fps=stats.updates / stats.seconds,
        mbps=stats.bytes / stats.seconds / 1e6,
        latency_ms=statistics.median(stats.latencies) * 1000,
        cpu_ms_per_mb=None if cpu is None else cpu * 1000 / (stats.bytes / 1e6),
        updates=stats.updates,
        bytes=stats.bytes,
        seconds=stats.seconds,
    )


async def measure_all(ends: Endpoints, seconds: float, runs: int) -> list[Run]:
    """Every combination ``runs`` times, interleaved, paths in a rotating order."""
    results: list[Run] = []
    combos = [(encoding, mode) for encoding in ENCODINGS for mode in MODES]
    total = runs * len(combos) * len(PATHS)
    for repetition in range(runs):
        order = PATHS[repetition % len(PATHS) :] + PATHS[: repetition % len(PATHS)]
        for encoding, mode in combos:
            for path in order:
                try:
                    run = await one_run(path, encoding, mode, seconds, ends)
                except (TimeoutError, OSError, RFBProtocolError) as exc:
                    raise RuntimeError(f"{encoding} {mode} over {path}: {exc!r}") from exc
                results.append(run)
                cpu = "" if run.cpu_ms_per_mb is None else f" {run.cpu_ms_per_mb:6.2f} CPU ms/MB"
                print(
                    f"  [{len(results):>3}/{total}] {encoding:<5} {mode:<11} {path:<10} "
                    f"{run.fps:6.1f} fps {run.mbps:7.1f} MB/s {run.latency_ms:7.2f} ms{cpu}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


# --- reporting ----------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(results: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for encoding in ENCODINGS:
        for mode in MODES:
            by_path = {}
            for path in PATHS:
                runs = [r for r in results if (r.encoding, r.mode, r.path) == (encoding, mode, path)]
                by_path[path] = {
                    "encoding": encoding,
                    "mode": mode,
                    "path": path,
                    "runs": len(runs),
                    "fps": statistics.median(r.fps for r in runs),
                    "mbps": statistics.median(r.mbps for r in runs),
                    "latency_ms": statistics.median(r.latency_ms for r in runs),
                    "mb_per_update": statistics.median(r.bytes / r.updates / 1e6 for r in runs),
                    "cpu_ms_per_mb": _median([r.cpu_ms_per_mb for r in runs]),
                }
            relay, websockify = by_path["relay"], by_path["websockify"]
            ratios = {
                "fps": relay["fps"] / websockify["fps"],
                "mbps": relay["mbps"] / websockify["mbps"],
                "latency": relay["latency_ms"] / websockify["latency_ms"],
                "cpu": relay["cpu_ms_per_mb"] / websockify["cpu_ms_per_mb"],
            }
            relay["vs_websockify"] = ratios
            relay["flagged"] = (
                ratios["fps"] < 1 - FLAG_THRESHOLD
                or ratios["mbps"] < 1 - FLAG_THRESHOLD
                or ratios["latency"] > 1 + FLAG_THRESHOLD
            )
            rows.extend(by_path[path] for path in PATHS)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| encoding | mode | path | fps | MB/s | latency ms | MB/update | relay CPU ms/MB "
        "| fps relay/ws | MB/s relay/ws | latency relay/ws | CPU relay/ws |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratios = row.get("vs_websockify")
        ratio_cells = [""] * 4
        if ratios:
            ratio_cells = [f"{ratios[k]:.2f}" for k in ("fps", "mbps", "latency", "cpu")]
        path = row["path"] + (" **!**" if row.get("flagged") else "")
        cpu = "" if row["cpu_ms_per_mb"] is None else f"{row['cpu_ms_per_mb']:.2f}"
        lines.append(
            f"| {row['encoding']} | {row['mode']} | {path} | {row['fps']:.1f} | {row['mbps']:.1f} "
            f"| {row['latency_ms']:.2f} | {row['mb_per_update']:.3f} | {cpu} | " + " | ".join(ratio_cells) + " |"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


async def bench(
    namek: LiveNamek, sandbox_id: int, websockify_pid: int, websockify_port: int, args: argparse.Namespace
) -> list[Run]:
    vnc_socket, password = namek.screen_target(sandbox_id)
    assert namek.daphne is not None
    ends = Endpoints(
        relay_url=f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/screen/",
        token=namek.token("owner"),
        websockify_url=f"ws://127.0.0.1:{websockify_port}/",
        vnc_socket=vnc_socket,
        password=password,
        daphne_pid=namek.daphne.pid,
        websockify_pid=websockify_pid,
    )
    return await measure_all(ends, args.seconds, args.runs)


def run_benchmark(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Set everything up, measure, and tear everything down again (also on errors)."""
    namek = LiveNamek(base)
    websockify: subprocess.Popen[bytes] | None = None
    sandbox_id: int | None = None
    try:
        print(f"starting Namek in {base} ...", file=sys.stderr, flush=True)
        namek.start()
        sandbox = namek.create_sandbox(name="relay-bench")
        sandbox_id = int(sandbox["id"])
        busy = asyncio.run(make_screen_busy(namek.browser_socket(sandbox_id)))
        print(f"sandbox {sandbox_id} ({sandbox.get('screen')}): {busy}", file=sys.stderr, flush=True)
        vnc_socket, _password = namek.screen_target(sandbox_id)
        websockify, port = start_websockify(vnc_socket, namek.logs / "websockify.log")
        load_before = os.getloadavg()[0]
        results = asyncio.run(bench(namek, sandbox_id, websockify.pid, port, args))
        load_after = os.getloadavg()[0]
    finally:
        stop_process(websockify)
        try:
            if sandbox_id is not None:
                with contextlib.suppress(Exception):
                    namek.delete_sandbox(sandbox_id)
        finally:
            namek.stop()
    return {
        "seconds": args.seconds,
        "runs": args.runs,
        "websockify_version": importlib.metadata.version("websockify"),
        "screen": sandbox.get("screen"),
        "busy": busy,
        "load_average": [load_before, load_after],
        "cpus": os.cpu_count(),
        "summary": summarise(results),
        "runs_detail": [asdict(r) for r in results],
    }


def report(result: dict[str, Any]) -> str:
    rows = result["summary"]
    lines = [
        f"Screen relay benchmark: median of {result['runs']} interleaved runs of {result['seconds']:g} s "
        f"per row; websockify {result['websockify_version']}; screen {result['screen']}, {result['busy']}; "
        f"load average {result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f} "
        f"on {result['cpus']} CPUs.",
        "MB = 10^6 bytes. Latency: request sent -> first bytes of the answer readable. relay CPU ms/MB: "
        "CPU time of the relaying process (Daphne, or websockify and its per-connection child) per MB. "
        "Ratios relay/websockify: fps and MB/s higher is better, latency and CPU lower is better. "
        f"**!** = relay more than {FLAG_THRESHOLD:.0%} worse than websockify on fps, MB/s or latency.",
        "",
        table(rows),
    ]
    flagged = [r for r in rows if r.get("flagged")]
    if flagged:
        lines += ["", "Flagged (relay vs websockify): " + "; ".join(f"{r['encoding']} {r['mode']}" for r in flagged)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each run (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--json", default="bench-results/relay.json", help="where to save the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:
        parser.error("--runs must be at least 1 and --seconds positive")

    return cli.run(args, "namek-bench-", run_benchmark, report)


if __name__ == "__main__":
    sys.exit(main())

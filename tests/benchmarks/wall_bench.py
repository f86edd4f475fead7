"""The wall's cost as the audience grows: 4 busy screens to 0, 1, 10 and 50 watchers.

Run with ``.venv/bin/python -m tests.benchmarks.wall_bench``.

What it does, in one run:

1. starts a real Namek (``tests.live.LiveNamek``: supervisor + Daphne, no warm pool, up to
   4 sandboxes per user) in a temporary directory and creates 4 sandboxes;
2. makes every screen change continuously: over each sandbox's own DevTools socket (not
   through Namek) its start page gets a full-screen element whose gradient and big number
   change every 200 ms, so every incremental update request finds most of the screen
   changed (about 4 MB of Raw pixels per update at 1280x800): the hub's worst case;
3. phases of ``--seconds`` each (after ``--warmup`` seconds not counted), watchers added
   between them: 0 (nobody watches: what the busy sandboxes cost Daphne by themselves),
   then 1 (**the baseline**), 10 and 50. A watcher is a websocket client of ``/ws/wall/``
   (the staff user's bearer token: it sees all 4 sandboxes) that reads every frame and
   acknowledges each thumbnail at once, as the page does once it has decoded it;
4. per phase it reads, at its start and end: the Daphne process's CPU seconds (user +
   system, psutil on its pid) and the hub's counters from ``GET /wall/stats`` (staff):
   VNC connections, updates read, thumbnails encoded (and the encoding threads' own CPU
   seconds, ``time.thread_time``), published (once for every watcher) and sent; and the
   thumbnails the watchers received.

The table: watchers; frames encoded/s (must stay flat: one encode per sandbox and frame,
whatever the audience); thumbnails sent/s; Daphne CPU % (100 = one core), of which
encoding; the rest (reading the VNC servers' Raw updates, the websockets); the CPU per
watcher, the CPU each watcher beyond the baseline's one added, and the ratios to the
1-watcher baseline. Results
are written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from tests.benchmarks import cli
from tests.live import LiveNamek

SANDBOXES = 4
AUDIENCES = (0, 1, 10, 50)
BASELINE = 1
CONNECT_TIMEOUT = 60.0

ANIMATE = """
(() => {
  document.getElementById('wall-bench')?.remove();
  const el = document.createElement('div');
  el.id = 'wall-bench';
  el.style.cssText = 'position:fixed;inset:0;z-index:2147483647;display:flex;align-items:center;'
    + 'justify-content:center;font:bold 200px sans-serif;color:#fff';
  document.body.append(el);
  let n = 0;
  clearInterval(window.__wallBench);
  window.__wallBench = setInterval(() => {
    n += 1;
    el.style.background = `linear-gradient(${(n * 17) % 360}deg, hsl(${(n * 37) % 360} 70% 45%), `
      + `hsl(${(n * 37 + 120) % 360} 70% 30%))`;
    el.textContent = String(n);
  }, 200);
  return 'animating';
})()
"""


async def animate(namek: LiveNamek, sandbox_id: int) -> None:
    """Start the animation in the sandbox's start page, over its own DevTools socket."""
    from tests.test_screen_relay import Cdp, cdp_page_id

    socket_path = namek.browser_socket(sandbox_id)
    page_id = await asyncio.to_thread(cdp_page_id, socket_path)
    async with unix_connect(socket_path, f"ws://127.0.0.1/devtools/page/{page_id}", max_size=None) as ws:
        answer = await Cdp(ws).evaluate(ANIMATE)
    if answer != "animating":
        raise RuntimeError(f"sandbox {sandbox_id}: the animation did not start: {answer!r}")


@dataclass
class Watcher:
    ws: ClientConnection
    thumbnails: int = 0
    lists: int = 0
    closed: str = ""
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self.thumbnails += 1
                    sandbox_id = int.from_bytes(frame[:4], "big")
                    await self.ws.send(json.dumps({"type": "ack", "id": sandbox_id}))
                else:
                    self.lists += 1
        except ConnectionClosed as exc:
            self.closed = f"closed: {exc}"


async def add_watchers(namek: LiveNamek, watchers: list[Watcher], count: int) -> None:
    url = f"{namek.ws_base}/ws/wall/"
    headers = {"Authorization": f"Bearer {namek.token('staff')}"}

    async def one() -> Watcher:
        ws = await connect(url, additional_headers=headers, open_timeout=CONNECT_TIMEOUT, max_size=None)
        watcher = Watcher(ws)
        watcher.task = asyncio.ensure_future(watcher.read())
        return watcher

    watchers.extend(await asyncio.gather(*(one() for _ in range(count))))
    # Accepted is not subscribed: wait until every new watcher has its list and a thumbnail.
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while any(w.lists == 0 or w.thumbnails == 0 for w in watchers):
        broken = [w.closed for w in watchers if w.closed]
        if broken:
            raise RuntimeError(f"a watcher was closed: {broken[0]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the watchers did not all get a thumbnail in time")
        await asyncio.sleep(0.1)


def wall_stats(namek: LiveNamek) -> dict[str, Any]:
    request = urllib.request.Request(namek.base_url + "/wall/stats")
    request.add_header("Authorization", f"Bearer {namek.token('staff')}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def sample(namek: LiveNamek, daphne: psutil.Process, watchers: list[Watcher]) -> dict[str, Any]:
    stats = await asyncio.to_thread(wall_stats, namek)
    return {
        "at": time.monotonic(),
        "cpu": cpu_seconds(daphne),
        "stats": stats,
        "received": sum(w.thumbnails for w in watchers),
    }


def phase_row(audience: int, start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    seconds = end["at"] - start["at"]

    def rate(name: str) -> float:
        return float(end["stats"][name] - start["stats"][name]) / seconds

    cpu = (end["cpu"] - start["cpu"]) / seconds * 100
    encode_cpu = rate("encode_seconds") * 100
    return {
        "watchers": audience,
        "seconds": seconds,
        "updates_per_s": rate("updates"),
        "encoded_per_s": rate("encoded"),
        "published_per_s": rate("published"),
        "sent_per_s": rate("sent"),
        "skipped_per_s": rate("skipped"),
        "received_per_s": (end["received"] - start["received"]) / seconds,
        "connects": end["stats"]["connects"] - start["stats"]["connects"],
        "connects_total": end["stats"]["connects"],
        "fps": end["stats"]["fps"],
        "thumbnail_box": end["stats"]["thumbnail_box"],
        "errors": end["stats"]["errors"] - start["stats"]["errors"],
        "feeds": end["stats"]["feeds"],
        "daphne_cpu_pct": cpu,
        "encode_cpu_pct": encode_cpu,
        "other_cpu_pct": cpu - encode_cpu,
    }


async def measure_phases(namek: LiveNamek, args: argparse.Namespace) -> list[dict[str, Any]]:
    assert namek.daphne is not None
    daphne = psutil.Process(namek.daphne.pid)
    watchers: list[Watcher] = []
    rows = []
    try:
        for audience in AUDIENCES:
            await add_watchers(namek, watchers, audience - len(watchers))
            print(f"{audience} watchers: warming up ...", file=sys.stderr, flush=True)
            await asyncio.sleep(args.warmup)
            start = await sample(namek, daphne, watchers)
            await asyncio.sleep(args.seconds)
            end = await sample(namek, daphne, watchers)
            broken = [w.closed for w in watchers if w.closed]
            if broken:
                raise RuntimeError(f"a watcher was closed during the phase: {broken[0]}")
            rows.append(phase_row(audience, start, end))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        for watcher in watchers:
            if watcher.task is not None:
                watcher.task.cancel()
            with contextlib.suppress(Exception):
                await watcher.ws.close()
    base = next(row for row in rows if row["watchers"] == BASELINE)
    for row in rows:
        audience = row["watchers"]
        row["cpu_per_watcher_pct"] = row["daphne_cpu_pct"] / audience if audience else None
        row["cpu_per_added_watcher_pct"] = (
            (row["daphne_cpu_pct"] - base["daphne_cpu_pct"]) / (audience - BASELINE) if audience > BASELINE else None
        )
        row["encoded_ratio"] = row["encoded_per_s"] / base["encoded_per_s"] if base["encoded_per_s"] else None
        row["cpu_ratio"] = row["daphne_cpu_pct"] / base["daphne_cpu_pct"] if base["daphne_cpu_pct"] else None
    return rows


def run_benchmark(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Set everything up, measure, and tear everything down again (also on errors and Ctrl-C)."""
    namek = LiveNamek(base, NAMEK_WARM_POOL="0", NAMEK_MAX_SANDBOXES_PER_USER=str(SANDBOXES))
    sandbox_ids: list[int] = []
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        print(f"starting Namek in {base} ...", file=sys.stderr, flush=True)
        namek.start()
        for number in range(SANDBOXES):
            status, sandbox = namek.api("POST", "/api/sandboxes", body={"name": f"wall-bench-{number + 1}"})
            assert status == 201, sandbox
            sandbox_ids.append(int(sandbox["id"]))
        for sandbox_id in sandbox_ids:
            namek.wait_phase(sandbox_id, "ready", timeout=90)
        for sandbox_id in sandbox_ids:
            asyncio.run(animate(namek, sandbox_id))
        rows = asyncio.run(measure_phases(namek, args))
        load_after = os.getloadavg()[0]
    finally:
        for sandbox_id in sandbox_ids:
            cli.delete_sandbox(namek, sandbox_id)
        namek.stop()
    return {
        "sandboxes": SANDBOXES,
        "seconds_per_phase": args.seconds,
        "warmup": args.warmup,
        "fps": rows[-1]["fps"],
        "thumbnail_box": rows[-1]["thumbnail_box"],
        "baseline_watchers": BASELINE,
        "load_average": [load_before, load_after],
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
        "rows": rows,
    }


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(result: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        f"Wall thumbnails: {result['sandboxes']} sandboxes whose whole screen changes every 200 ms, at most "
        f"{result['fps']:g} thumbnails/s each ({result['thumbnail_box'][0]}x{result['thumbnail_box'][1]} JPEG); "
        f"{result['seconds_per_phase']:g} s per phase after {result['warmup']:g} s of warm-up. CPU % of one core; "
        f"'encoding' is the encoding threads' own CPU time. Baseline: {result['baseline_watchers']} watcher. "
        f"Load average (1 min) {load[0]:.1f} -> {load[1]:.1f} on {result['cpus']} CPUs.",
        "",
        "| watchers | frames encoded/s | thumbnails sent/s | received/s | Daphne CPU % | of it encoding % "
        "| rest % | CPU % per watcher | CPU % per watcher added to the baseline | encoded / baseline "
        "| CPU / baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        per, added = row["cpu_per_watcher_pct"], row["cpu_per_added_watcher_pct"]
        label = f"{row['watchers']} (baseline)" if row["watchers"] == result["baseline_watchers"] else row["watchers"]
        lines.append(
            f"| {label} | {row['encoded_per_s']:.2f} | {row['sent_per_s']:.1f} | {row['received_per_s']:.1f} "
            f"| {row['daphne_cpu_pct']:.1f} | {row['encode_cpu_pct']:.1f} | {row['other_cpu_pct']:.1f} "
            f"| {_ratio(per)} | {_ratio(added)} | {_ratio(row['encoded_ratio'])} | {_ratio(row['cpu_ratio'])} |"
        )
    connects = sum(row["connects"] for row in result["rows"])
    errors = sum(row["errors"] for row in result["rows"])
    lines.append("")
    lines.append(
        f"VNC connections: {result['rows'][-1]['connects_total']} opened in all, {connects} of them during the "
        f"measured phases (errors: {errors}); {result['rows'][-1]['feeds']} feeds at the end, one per sandbox."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each phase, not counted (3)")
    parser.add_argument("--json", default="bench-results/wall.json", help="where to save the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    return cli.run(args, "namek-wall-bench-", run_benchmark, report)


if __name__ == "__main__":
    sys.exit(main())

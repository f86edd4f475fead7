"""Event delivery latency: an event stored -> read by websocket subscribers, at 100 events/s.

Run with ``.venv/bin/python -m tests.benchmarks.events_bench`` (``make bench``).

What it does, in one run:

1. per channel layer, in order: the default in-memory layer, then (unless ``--no-redis``)
   the Redis layer: Debian's ``redis-server``, started by this benchmark on a free port
   bound to 127.0.0.1 without persistence, and ``REDIS_URL`` pointing at it. If
   ``redis-server`` is not installed, that part is skipped and the report says so;
2. starts a real Namek for the layer (``tests.live.LiveNamek``: supervisor + Daphne, no
   warm pool) in a temporary directory and creates one sandbox (the row events hang on);
3. per writer (``--writer``, by default both, in this order) and per subscriber count (1,
   10, 50, in that order): opens that many websockets on
   ``/ws/sandboxes/<id>/events/?after=<last_event_seq>`` (bearer token, no read queue
   limit), so they get only events stored from then on. The handshake ends when Daphne
   accepts, before the consumer has checked the token, joined the sandbox's group and read
   the backlog (on a busy machine that takes a second or more for 50), so one marker note
   is posted and every subscriber must have read it before anything is timed. The writer
   then stores notes at 100 events/s, each at its own deadline on an absolute schedule, for
   1 s of warm-up (not counted) and then ``--seconds``. A write that is late goes out as
   soon as the previous one is done (none is skipped, none is made after the end), so a
   writer slower than 100 events/s writes as fast as it can: the achieved rate is
   reported. The writers:

   * ``api``: a thread of this benchmark posts the notes (``POST
     /api/sandboxes/<id>/events``) on one keep-alive HTTP connection, so Daphne both
     stores and fans out (one sync thread for the views: it may not take 100 posts/s);
   * ``direct``: a separate Python process with the Namek's environment (Django set up as
     ``manage.py`` does) calls ``sandboxes.events.record(id, "person.note", text,
     actor="bench")``, which stores the event and publishes it to the channel layer, as
     the sandbox supervisor (another process) does with the events it writes. It is started
     and set up before the subscribers connect, waits for a start line on its stdin, then
     prints how many events it wrote and its achieved rate. Only the Redis layer carries a
     message from another process to Daphne (with the in-memory layer subscribers would
     see such events only at their 2 s database re-check), so in-memory rows use ``api``
     only.

   Each subscriber notes ``time.time()`` as it reads each frame; **the latency of one
   delivery** is that time minus the event's ``at`` (taken by Namek when it stored the
   event; same machine, same clock). Every (subscriber, event) pair of the measured part
   counts. After the writer stops, the subscribers are given up to ``DRAIN_SECONDS`` to
   receive the last event; then each subscriber's stream is checked against what was
   written (marker and warm-up included): every event exactly once (``missing``,
   ``duplicates``) and in ``seq`` order.

**The baseline**, measured in the same run on the same connections: the websocket ping
round trip to Daphne (``await ws.ping()``, then the pong waiter), which every subscriber
sends every ``PING_SECONDS`` (spread out) during the measured part. Daphne's websocket
layer (autobahn, in the reactor) answers pings without the ASGI application, so this is
what any frame costs on these connections on this machine at that load; the table shows delivery p50
and p99 divided by the ping's p50 and p99.

The table shows, per layer, writer and subscriber count, p50, p90, p99 and the maximum in
milliseconds, the ping baseline and the ratios. Results (per-row figures, per-event
worst and best latency, every ping) are written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.benchmarks import cli
from tests.live import ROOT, LiveNamek, RedisServer

COUNTS = (1, 10, 50)
RATE = 100.0  # events per second
WARMUP_SECONDS = 1.0
PING_SECONDS = 0.5
#: how long subscribers may take to receive the last event after the writer stopped
#: (more than twice the events consumer's database re-check, RECHECK_SECONDS = 2)
DRAIN_SECONDS = 5.0
#: how long all subscribers may take to be subscribed (to receive a first event)
SUBSCRIBE_TIMEOUT = 60.0
#: after the last event arrived everywhere: time for late duplicates to show up
GRACE_SECONDS = 0.3
MEMORY, REDIS = "in-memory", "redis"
API, DIRECT = "api", "direct"
WRITERS = (API, DIRECT)


def terminate(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- redis ----------------------------------------------------------------------------------


# --- subscribers ------------------------------------------------------------------------------


@dataclass
class Subscriber:
    ws: ClientConnection
    #: (time.time() when read, the frame's text), parsed after the run
    frames: list[tuple[float, str]] = field(default_factory=list)
    #: ping round trips in seconds, of pings sent within ``window`` (time.time() from, to)
    pings: list[float] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    closed: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def read(self) -> None:
        try:
            while True:
                text = await self.ws.recv()
                self.frames.append((time.time(), text if isinstance(text, str) else text.decode()))
        except ConnectionClosed as exc:
            self.closed = f"closed: {exc}"

    async def ping_forever(self) -> None:
        await asyncio.sleep(random.uniform(0, PING_SECONDS))  # spread the subscribers' pings out
        with contextlib.suppress(ConnectionClosed):
            while True:
                started = time.monotonic()
                sent = time.time()
                waiter = await self.ws.ping()
                latency = await asyncio.wait_for(waiter, 30)
                if self.window[0] <= sent < self.window[1]:
                    self.pings.append(float(latency))
                await asyncio.sleep(max(0.0, started + PING_SECONDS - time.monotonic()))

    def last_seq(self) -> int:
        return int(json.loads(self.frames[-1][1])["seq"]) if self.frames else 0


async def open_subscribers(namek: LiveNamek, sandbox_id: int, after: int, count: int) -> list[Subscriber]:
    url = f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/events/?after={after}"
    headers = {"Authorization": f"Bearer {namek.token()}"}

    async def one() -> Subscriber:
        ws = await connect(url, additional_headers=headers, open_timeout=20, max_queue=None, ping_interval=None)
        return Subscriber(ws)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    subscribers = [r for r in results if isinstance(r, Subscriber)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_subscribers(subscribers)
        raise RuntimeError(f"{len(failures)} of {count} subscribers could not connect: {failures[0]!r}")
    for sub in subscribers:
        sub.tasks = [asyncio.create_task(sub.read()), asyncio.create_task(sub.ping_forever())]
    return subscribers


async def close_subscribers(subscribers: list[Subscriber]) -> None:
    for sub in subscribers:
        for task in sub.tasks:
            task.cancel()
    await asyncio.gather(*(t for sub in subscribers for t in sub.tasks), return_exceptions=True)
    await asyncio.gather(*(asyncio.wait_for(sub.ws.close(), 5) for sub in subscribers), return_exceptions=True)


# --- the writers ------------------------------------------------------------------------------


@dataclass
class Written:
    seq: int
    at: float  # the event's ``at`` as a Unix time
    deadline: float  # monotonic: when it was due
    sent: float  # monotonic: when its write began (request written, or record() called)
    answered: float  # monotonic: when it was done (201 read, or record() returned)
    warmup: bool


class Writer(threading.Thread):
    """Writes notes, one per 1/RATE seconds on an absolute schedule from ``start_at``
    (monotonic) for ``warmup`` + ``seconds``; a late write goes out at once (none is
    skipped), and nothing is written after the end. ``prepare()`` (blocking) readies it,
    ``schedule()`` sets the times, ``start()`` runs it; ``done`` is set when it ended,
    ``abort()`` ends it early and ``close()`` releases what it holds."""

    kind = ""

    def __init__(self) -> None:
        super().__init__(name=f"events-bench-{self.kind}-writer", daemon=True)
        self.start_at = self.measure_from = self.end = 0.0
        self.stop = threading.Event()
        self.done = threading.Event()
        self.written: list[Written] = []
        self.error: BaseException | None = None
        self.reconnects = 0
        #: what the writer says of itself when done (the direct writer's last line)
        self.summary = ""

    def prepare(self) -> None:
        pass

    def schedule(self, start: float, warmup: float, seconds: float) -> None:
        self.start_at = start
        self.measure_from = start + warmup
        self.end = start + warmup + seconds

    def abort(self) -> None:
        self.stop.set()

    def close(self) -> None:
        pass


class ApiWriter(Writer):
    """Posts notes on one keep-alive HTTP connection."""

    kind = "api"

    def __init__(self, namek: LiveNamek, sandbox_id: int) -> None:
        super().__init__()
        self.port = namek.port
        self.path = f"/api/sandboxes/{sandbox_id}/events"
        self.headers = {"Authorization": f"Bearer {namek.token()}", "Content-Type": "application/json"}

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            number = 0
            while not self.stop.is_set():
                deadline = self.start_at + number / RATE
                if deadline >= self.end or time.monotonic() >= self.end:
                    return
                delay = deadline - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.written.append(self._post(conn, number, deadline))
                number += 1
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()
            self.done.set()

    def _post(self, conn: http.client.HTTPConnection, number: int, deadline: float) -> Written:
        body = json.dumps({"text": f"events-bench note {number}"}).encode()
        for attempt in (1, 2):
            sent = time.monotonic()
            try:
                conn.request("POST", self.path, body, self.headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # Daphne closed the kept-alive connection before reading the request
                conn.close()
                self.reconnects += 1
                if attempt == 2:
                    raise
        answered = time.monotonic()
        if response.status != 201:
            raise RuntimeError(f"POST {self.path} answered {response.status}: {data[:300]!r}")
        event = json.loads(data)
        return Written(
            seq=int(event["seq"]),
            at=datetime.fromisoformat(event["at"]).timestamp(),
            deadline=deadline,
            sent=sent,
            answered=answered,
            warmup=sent < self.measure_from,
        )


#: what the direct writer process runs: Django set up as manage.py does, then direct_writer()
DIRECT_WRITER_CODE = (
    "import django, sys; django.setup(); "
    "from tests.benchmarks.events_bench import direct_writer; sys.exit(direct_writer(int(sys.argv[1])))"
)


def direct_writer(sandbox_id: int) -> int:
    """The direct writer process (``DIRECT_WRITER_CODE``). Prints ``READY`` once set up,
    waits for ``GO <start> <warmup> <seconds>`` on stdin (``start`` is a ``time.monotonic()``
    of the benchmark's: on Linux that clock is the same in every process), stores notes with
    ``sandboxes.events.record`` on the schedule, then prints ``RESULT <json>`` (every event:
    seq, at, deadline, start and end of its record() call) and a line saying how many events
    it wrote and its achieved rate. An empty stdin ends it without writing.

    record() is called as the sandbox supervisor calls ``services``: from an asyncio loop
    through ``sync_to_async``, so the publish in it (``async_to_sync``) runs on that loop and
    reuses its channel layer connections. (Called from plain sync code, every publish would
    make an event loop, a thread and a Redis connection of its own.)"""
    return asyncio.run(_direct_writer(sandbox_id))


async def _direct_writer(sandbox_id: int) -> int:
    from asgiref.sync import sync_to_async
    from django.db import connection

    from sandboxes import events

    record = sync_to_async(events.record)
    await sync_to_async(connection.ensure_connection)()
    print("READY", flush=True)
    words = (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).split()
    if len(words) != 4 or words[0] != "GO":
        return 0
    start, warmup, seconds = (float(word) for word in words[1:])
    measure_from, end = start + warmup, start + warmup + seconds
    written: list[list[Any]] = []
    number = 0
    while True:
        deadline = start + number / RATE
        if deadline >= end or time.monotonic() >= end:
            break
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.monotonic()
        event = await record(sandbox_id, "person.note", f"events-bench note {number}", actor="bench")
        answered = time.monotonic()
        if event is None:
            raise RuntimeError(f"sandbox {sandbox_id} is gone")
        written.append([event["seq"], event["at"], deadline, sent, answered])
        number += 1
    measured = sum(1 for w in written if w[3] >= measure_from)
    print("RESULT " + json.dumps(written), flush=True)
    print(
        f"direct writer: wrote {len(written)} events ({measured} in the measured {seconds:g} s, "
        f"{len(written) - measured} in the warm-up): {measured / seconds:.1f} events/s",
        flush=True,
    )
    return 0


class DirectWriter(Writer):
    """``direct_writer()`` in a separate process with the Namek's environment: ``prepare()``
    starts it and waits until it is set up, ``run()`` starts its schedule and reads what it
    wrote. Its stderr goes to ``log``; it is terminated by ``abort()`` and ``close()``."""

    kind = "direct"
    READY_TIMEOUT = 60.0

    def __init__(self, namek: LiveNamek, sandbox_id: int, log: Path) -> None:
        super().__init__()
        self.sandbox_id = sandbox_id
        self.env = {**namek.env, "DJANGO_SETTINGS_MODULE": "namek_web.settings"}
        self.log = log
        self.process: subprocess.Popen[str] | None = None

    def prepare(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", DIRECT_WRITER_CODE, str(self.sandbox_id)],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # a Ctrl-C to the terminal leaves it to close()
            )
        ready = threading.Event()
        threading.Thread(target=self._read_ready, args=(ready,), daemon=True).start()
        if not ready.wait(self.READY_TIMEOUT) or self.process.poll() is not None:
            self.close()
            raise RuntimeError(f"the direct writer was not ready within {self.READY_TIMEOUT:g} s: {self._log_tail()}")

    def _read_ready(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip() == "READY":
                ready.set()
                return
        ready.set()  # it exited: prepare() sees poll() is not None

    def run(self) -> None:
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(f"GO {self.start_at!r} {self.measure_from - self.start_at!r} ")
            self.process.stdin.write(f"{self.end - self.measure_from!r}\n")
            self.process.stdin.close()
            result: list[list[Any]] | None = None
            for line in self.process.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
                elif line.startswith("direct writer:"):
                    self.summary = line.strip()
            code = self.process.wait()
            if self.stop.is_set():
                return
            if code != 0 or result is None:
                raise RuntimeError(f"the direct writer exited with {code}: {self._log_tail()}")
            self.written = [
                Written(
                    seq=int(seq),
                    at=datetime.fromisoformat(at).timestamp(),
                    deadline=deadline,
                    sent=sent,
                    answered=answered,
                    warmup=sent < self.measure_from,
                )
                for seq, at, deadline, sent, answered in result
            ]
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def abort(self) -> None:
        super().abort()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def close(self) -> None:
        if self.process is not None:
            terminate(self.process)
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:] or "(nothing on stderr)"
        return "(no log)"


def make_writer(kind: str, namek: LiveNamek, sandbox_id: int) -> Writer:
    if kind == API:
        return ApiWriter(namek, sandbox_id)
    return DirectWriter(namek, sandbox_id, namek.logs / "direct-writer.log")


# --- one measurement ----------------------------------------------------------------------------


async def measure_count(
    namek: LiveNamek, sandbox_id: int, writer_kind: str, count: int, seconds: float
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    status, sandbox = namek.api("GET", f"/api/sandboxes/{sandbox_id}")
    if status != 200:
        raise RuntimeError(f"GET /api/sandboxes/{sandbox_id} answered {status}: {sandbox}")
    after = int(sandbox["last_event_seq"])
    loop = asyncio.get_running_loop()
    writer = make_writer(writer_kind, namek, sandbox_id)
    try:
        await loop.run_in_executor(None, writer.prepare)  # the direct writer's process, set up
        connecting = time.monotonic()
        subscribers = await open_subscribers(namek, sandbox_id, after, count)
        connected = time.monotonic() - connecting
        try:
            # The handshake ends when Daphne accepts, before the consumer has checked the token,
            # joined the group and read the backlog: only an event received proves all that.
            marker = await loop.run_in_executor(None, post_marker, namek, sandbox_id)
            await wait_received(subscribers, marker, SUBSCRIBE_TIMEOUT, "the marker event")
            subscribed = time.monotonic() - connecting
            writer.schedule(time.monotonic() + 0.05, WARMUP_SECONDS, seconds)
            to_wall = time.time() - time.monotonic()
            for sub in subscribers:
                sub.window = (writer.measure_from + to_wall, writer.end + to_wall)
            writer.start()
            await loop.run_in_executor(None, writer.done.wait)
            if writer.error is not None:
                raise RuntimeError(f"the {writer.kind} writer failed: {writer.error!r}") from writer.error
            if not any(not w.warmup for w in writer.written):
                raise RuntimeError(f"the {writer.kind} writer wrote nothing in the measured part")
            with contextlib.suppress(TimeoutError):  # analyse() counts what is missing
                await wait_received(subscribers, writer.written[-1].seq, DRAIN_SECONDS, "the last event", strict=False)
            await asyncio.sleep(GRACE_SECONDS)
        finally:
            writer.abort()
            await close_subscribers(subscribers)
            if writer.is_alive():
                await loop.run_in_executor(None, writer.done.wait, 35)
    finally:
        writer.abort()
        await loop.run_in_executor(None, writer.close)
    row, events, pings = analyse(count, writer, subscribers, marker)
    row.update(connect_seconds=connected, subscribe_seconds=subscribed)
    return row, events, pings


def post_marker(namek: LiveNamek, sandbox_id: int) -> int:
    status, event = namek.api("POST", f"/api/sandboxes/{sandbox_id}/events", body={"text": "events-bench: all here?"})
    if status != 201:
        raise RuntimeError(f"POST /api/sandboxes/{sandbox_id}/events answered {status}: {event}")
    return int(event["seq"])


async def wait_received(
    subscribers: list[Subscriber], seq: int, timeout: float, what: str, *, strict: bool = True
) -> None:
    """Until every subscriber has read event ``seq`` (or a later one); TimeoutError. A closed
    subscriber is an error if ``strict``, else it is not waited for."""
    deadline = time.monotonic() + timeout
    while any(sub.last_seq() < seq for sub in subscribers if strict or not sub.closed):
        gone = [sub.closed for sub in subscribers if sub.closed]
        if gone and strict:
            raise RuntimeError(f"{len(gone)} subscribers were closed: {gone[0]}")
        if time.monotonic() >= deadline:
            late = sum(1 for sub in subscribers if sub.last_seq() < seq)
            raise TimeoutError(f"{late} of {len(subscribers)} subscribers did not get {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


def analyse(
    count: int, writer: Writer, subscribers: list[Subscriber], marker: int
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    written: dict[int, Written | None] = {marker: None, **{w.seq: w for w in writer.written}}
    measured = [w for w in writer.written if not w.warmup]
    latencies: list[float] = []
    per_event: dict[int, list[float]] = {w.seq: [] for w in measured}
    missing = duplicates = out_of_order = foreign = 0
    closed_early = [sub.closed for sub in subscribers if sub.closed and sub.last_seq() < writer.written[-1].seq]
    for sub in subscribers:
        seen: set[int] = set()
        previous = 0
        for received, text in sub.frames:
            event = json.loads(text)
            seq = int(event["seq"])
            if seq <= previous:
                out_of_order += 1
            previous = max(previous, seq)
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if seq not in written:
                foreign += 1  # stored by someone else (e.g. a phase event): not ours to time
                continue
            mine = written[seq]
            if mine is not None and not mine.warmup:
                took = (received - datetime.fromisoformat(event["at"]).timestamp()) * 1000
                latencies.append(took)
                per_event[seq].append(took)
        missing += len(written.keys() - seen)
    pings = [p * 1000 for sub in subscribers for p in sub.pings]
    achieved = len(measured) / (writer.end - writer.measure_from)
    writes = [(w.answered - w.sent) * 1000 for w in measured]
    row: dict[str, Any] = {
        "writer": writer.kind,
        "subscribers": count,
        "events_written": len(measured),
        "warmup_events": len(writer.written) - len(measured),
        "achieved_rate": achieved,
        "max_lateness_ms": max((w.sent - w.deadline) * 1000 for w in measured),
        "measured_seconds": writer.end - writer.measure_from,
        "write_p50_ms": percentile(writes, 50),
        "write_p99_ms": percentile(writes, 99),
        "writer_says": writer.summary,
        "http_reconnects": writer.reconnects,
        "deliveries": len(latencies),
        "expected_deliveries": len(measured) * count,
        "missing": missing,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "foreign_events": foreign,
        "closed_early": closed_early,
        "ping_samples": len(pings),
    }
    if latencies:
        row.update(
            p50_ms=percentile(latencies, 50),
            p90_ms=percentile(latencies, 90),
            p99_ms=percentile(latencies, 99),
            max_ms=max(latencies),
            mean_ms=statistics.fmean(latencies),
            min_ms=min(latencies),
            over_1s=sum(1 for t in latencies if t >= 1000),
        )
    if pings:
        row.update(ping_p50_ms=percentile(pings, 50), ping_p99_ms=percentile(pings, 99), ping_max_ms=max(pings))
    if latencies and pings:
        row.update(p50_ratio=row["p50_ms"] / row["ping_p50_ms"], p99_ratio=row["p99_ms"] / row["ping_p99_ms"])
    events = [
        {
            "seq": w.seq,
            "due_s": round(w.deadline - measured[0].deadline, 4),
            "write_ms": round((w.answered - w.sent) * 1000, 3),
            "received_by": len(per_event[w.seq]),
            "min_ms": round(min(per_event[w.seq]), 3) if per_event[w.seq] else None,
            "max_ms": round(max(per_event[w.seq]), 3) if per_event[w.seq] else None,
        }
        for w in measured
    ]
    return row, events, [round(p, 3) for p in pings]


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
        return output.splitlines()[0].strip() if output else "unknown"
    return "unknown"


# --- per layer, and the whole run -----------------------------------------------------------------


def measure_layer(
    layer: str, writers: list[str], base: Path, args: argparse.Namespace, env: dict[str, str]
) -> list[dict[str, Any]]:
    """A Namek with this channel layer, one sandbox, every writer and subscriber count; torn
    down after."""
    directory = base / layer
    directory.mkdir(exist_ok=True)
    namek = LiveNamek(directory, NAMEK_WARM_POOL="0", **env)
    sandbox_id: int | None = None
    rows: list[dict[str, Any]] = []
    try:
        print(f"[{layer}] starting Namek in {directory} ...", file=sys.stderr, flush=True)
        namek.start()
        sandbox_id = int(namek.create_sandbox(name="events-bench")["id"])
        for kind in writers:
            for count in COUNTS:
                label = f"[{layer}/{kind}] {count}"
                print(f"{label} subscribers, {args.seconds:g} s at {RATE:g} events/s ...", file=sys.stderr)
                row, events, pings = asyncio.run(measure_count(namek, sandbox_id, kind, count, args.seconds))
                row["layer"] = layer
                row["events"] = events
                row["pings_ms"] = pings
                rows.append(row)
                print(
                    f"{label}: written at {row['achieved_rate']:.1f}/s, p50 {row.get('p50_ms', float('nan')):.2f} ms, "
                    f"p99 {row.get('p99_ms', float('nan')):.2f} ms, missing {row['missing']}, "
                    f"duplicates {row['duplicates']}" + (f" ({row['writer_says']})" if row["writer_says"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if sandbox_id is not None:
            cli.delete_sandbox(namek, sandbox_id)
        namek.stop()
    return rows


def run_benchmark(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Set everything up, measure, and tear everything down again (also on errors and Ctrl-C)."""
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    notes: list[str] = []
    writers = [kind for kind in WRITERS if kind in (args.writer or WRITERS)]
    rows: list[dict[str, Any]] = []
    if API in writers:
        rows += measure_layer(MEMORY, [API], base, args, {})
    else:
        notes.append(
            "In-memory channel layer not measured: only the api writer applies to it (another process's "
            "publish cannot reach Daphne's in-memory layer)."
        )
    redis_version = ""
    if args.no_redis:
        notes.append("Redis channel layer not measured (--no-redis).")
    elif shutil.which("redis-server") is None:
        notes.append("redis-server not found (Debian package redis-server): the Redis channel layer was skipped.")
        print(notes[-1], file=sys.stderr, flush=True)
    else:
        redis = RedisServer(base)
        try:
            redis.start()
            redis_version = version(["redis-server", "--version"])
            rows += measure_layer(REDIS, writers, base, args, {"REDIS_URL": redis.url})
        finally:
            redis.stop()
    load_after = os.getloadavg()[0]
    return {
        "seconds_per_count": args.seconds,
        "warmup_seconds": WARMUP_SECONDS,
        "rate": RATE,
        "counts": list(COUNTS),
        "writers": {
            API: "POST /api/sandboxes/<id>/events on one keep-alive HTTP connection (Daphne stores and fans out)",
            DIRECT: "sandboxes.events.record() in a separate process, published through the channel layer",
        },
        "ping_every_seconds": PING_SECONDS,
        "baseline": "websocket ping round trip to Daphne on the subscribers' connections",
        "redis": redis_version,
        "notes": notes,
        "load_average": [load_before, load_after],
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
        "rows": rows,
    }


def _ms(row: dict[str, Any], key: str, digits: int = 2) -> str:
    value = row.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def _label(row: dict[str, Any]) -> str:
    return f"{row['layer']}/{row['writer']}/{row['subscribers']}"


def report(result: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        f"Event delivery latency: event stored (its `at`) -> frame read by each websocket subscriber, "
        f"{result['rate']:g} events/s written for {result['seconds_per_count']:g} s per row (after "
        f"{result['warmup_seconds']:g} s not counted), ms, every (subscriber, event) pair. Writer api: notes "
        "POSTed through the API on one keep-alive connection; direct: sandboxes.events.record() in a separate "
        "process (as the supervisor writes), published through the channel layer. Baseline: the websocket "
        f"ping round trip to Daphne on the same connections in the same run (every {result['ping_every_seconds']:g} s "
        f"per subscriber). Load average (1 min) {load[0]:.1f} -> {load[1]:.1f} on {result['cpus']} CPUs"
        + (f"; {result['redis']}." if result["redis"] else "."),
        "",
        "| layer | writer | subscribers | events written | achieved rate /s | deliveries | p50 ms | p90 ms | p99 ms "
        "| max ms | ping p50 ms | ping p99 ms | p50 / ping | p99 / ping | missing | duplicates |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['layer']} | {row['writer']} | {row['subscribers']} | {row['events_written']} "
            f"| {row['achieved_rate']:.1f} "
            f"| {row['deliveries']} | {_ms(row, 'p50_ms')} | {_ms(row, 'p90_ms')} | {_ms(row, 'p99_ms')} "
            f"| {_ms(row, 'max_ms')} | {_ms(row, 'ping_p50_ms')} | {_ms(row, 'ping_p99_ms')} "
            f"| {_ms(row, 'p50_ratio')} | {_ms(row, 'p99_ratio')} | {row['missing']} | {row['duplicates']} |"
        )
    checks = [
        f"{_label(row)}: {row['missing']} missing, {row['duplicates']} duplicates, "
        f"{row['out_of_order']} frames out of seq order"
        for row in result["rows"]
        if row["missing"] or row["duplicates"] or row["out_of_order"]
    ]
    checks += [
        f"{_label(row)}: {len(row['closed_early'])} subscribers closed early ({row['closed_early'][0]})"
        for row in result["rows"]
        if row["closed_early"]
    ]
    lines.append("")
    lines.append(
        "Delivery check: "
        + ("; ".join(checks) if checks else "every subscriber got every event exactly once, in seq order.")
    )
    slow = [row for row in result["rows"] if row["achieved_rate"] < result["rate"] * 0.98]
    if slow:
        lines.append(
            f"The writer did not keep up with {result['rate']:g} events/s (when late, the next write goes out as "
            "soon as the previous one is done): "
            + "; ".join(
                f"{_label(row)}: {row['achieved_rate']:.1f}/s, a write ("
                + ("POST answered" if row["writer"] == API else "record() returned")
                + f") took p50 {row['write_p50_ms']:.1f} ms"
                for row in slow
            )
            + "."
        )
    lines += result["notes"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per subscriber count (10)")
    parser.add_argument("--no-redis", action="store_true", help="measure the in-memory channel layer only")
    parser.add_argument(
        "--writer",
        action="append",
        choices=WRITERS,
        help="who writes the events: api (POST through the API; both layers) or direct (record() in a separate "
        "process; Redis layer only); repeat for both (default: both)",
    )
    parser.add_argument("--json", default="bench-results/events.json", help="where to save the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.no_redis and args.writer and API not in args.writer:
        parser.error("--writer direct needs the Redis layer (not --no-redis)")

    return cli.run(args, "namek-events-bench-", run_benchmark, report)


if __name__ == "__main__":
    sys.exit(main())

"""Take over and hand back: how long the API takes, against a plain read of the lease.

Run with ``.venv/bin/python -m tests.benchmarks.control_bench`` (``make bench``).

One run starts a real Namek (``tests.live.LiveNamek``: supervisor + Daphne, SQLite, the
in-memory channel layer) and creates one sandbox with no agent on it. Per round
(``--rounds``, after ``--warmup``), in this order:

* ``GET /api/sandboxes/<id>/control``, **the baseline**: the same authentication, lookup
  and JSON, no change;
* ``POST …/takeover``: the lock, the lease, ``control.requested`` and ``control.granted``
  with a screenshot of the screen, published to the channel layer;
* ``POST …/handback``: the same with ``control.handed_back`` and its screenshot;
* ``screenshot``: the part of each that grabs the screen: one full RFB frame from the
  sandbox's VNC server (Raw encoding, 1280x800x32) and its PNG (``control.grab``), taken
  by this process on the same socket.

An agent's pause adds the time its step in flight needs (an LLM call: seconds), and is
not measured here. Results (every sample) go to ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.benchmarks import cli
from tests.live import LiveNamek

PATHS = ("control (baseline)", "takeover", "handback", "screenshot")


def timed_request(namek: LiveNamek, method: str, path: str) -> float:
    request = urllib.request.Request(namek.base_url + path, data=b"" if method == "POST" else None, method=method)
    request.add_header("Authorization", f"Bearer {namek.token()}")
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        assert response.status == 200, response.status
    return (time.perf_counter() - started) * 1000


def measure(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    import django

    namek = LiveNamek(base)
    samples: dict[str, list[float]] = {name: [] for name in PATHS}
    try:
        print(f"starting Namek in {base} ...", file=sys.stderr, flush=True)
        namek.start()
        sandbox_id = int(namek.create_sandbox(name="control-bench")["id"])
        # This process grabs the screen itself, with Namek's code, on the same VNC socket.
        os.environ.update({"NAMEK_DATA_DIR": str(namek.data_dir), "DJANGO_SETTINGS_MODULE": "namek_web.settings"})
        django.setup()
        from sandboxes import control
        from sandboxes.backends.local import LocalBackend

        target = LocalBackend(str(namek.data_dir / "supervisor.sock")).screen_target(sandbox_id)
        path = f"/api/sandboxes/{sandbox_id}"
        for round_number in range(args.warmup + args.rounds):
            figures = {
                PATHS[0]: timed_request(namek, "GET", f"{path}/control"),
                PATHS[1]: timed_request(namek, "POST", f"{path}/takeover"),
                PATHS[2]: timed_request(namek, "POST", f"{path}/handback"),
            }
            started = time.perf_counter()
            image = asyncio.run(control.grab(target))
            figures[PATHS[3]] = (time.perf_counter() - started) * 1000
            assert image[:4] == b"\x89PNG"
            if round_number >= args.warmup:
                for name, value in figures.items():
                    samples[name].append(value)
            print(f"round {round_number + 1}/{args.warmup + args.rounds}", file=sys.stderr, end="\r", flush=True)
        print(file=sys.stderr)
    finally:
        namek.stop()
    return {"rounds": args.rounds, "load": os.getloadavg()[0], "samples": samples}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def report(result: dict[str, Any]) -> str:
    samples = result["samples"]
    base50 = percentile(samples[PATHS[0]], 0.5)
    base99 = percentile(samples[PATHS[0]], 0.99)
    lines = [
        f"Take over and hand back, no agent: {result['rounds']} rounds, ms. Baseline: GET the lease "
        f"(same process, same auth). Load average (1 min) {result['load']:.1f} on 2 CPUs.",
        "",
        "| path | p50 ms | p99 ms | mean ms | p50 / baseline | p99 / baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in PATHS:
        values = samples[name]
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        mean = statistics.fmean(values)
        lines.append(f"| {name} | {p50:.1f} | {p99:.1f} | {mean:.1f} | {p50 / base50:.1f} | {p99 / base99:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="bench-results/control.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return cli.run(parser.parse_args(), "namek-control-bench-", measure, report)


if __name__ == "__main__":
    sys.exit(main())

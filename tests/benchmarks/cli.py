"""What every benchmark's main() does around its measurement: a temporary directory that
is removed unless the run failed (logs) or --keep, Ctrl-C and SIGTERM unwinding through
the clean-up, the report printed and the figures saved as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(
    args: argparse.Namespace,
    prefix: str,
    measure: Callable[[argparse.Namespace, Path], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds through the finally, as Ctrl-C does
    base = Path(tempfile.mkdtemp(prefix=prefix))
    keep = args.keep
    try:
        result = measure(args, base)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        print(f"failed; logs are under {base}", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    print(report(result))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out}", file=sys.stderr)
    return 0


def delete_sandbox(namek: Any, sandbox_id: int) -> None:
    """Delete a benchmark's sandbox before Namek stops; a failure is reported, not raised
    (it may be the reason the benchmark is ending)."""
    try:
        status, body = namek.api("DELETE", f"/api/sandboxes/{sandbox_id}")
    except OSError as exc:  # Daphne gone, e.g. after a Ctrl-C to the whole process group
        status, body = 0, str(exc)
    if status != 200:
        print(f"deleting sandbox {sandbox_id} failed ({status}): {body}", file=sys.stderr, flush=True)

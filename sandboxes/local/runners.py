"""Agent runner processes, supervised by the local supervisor.

A runner (``python -m sandboxes.agents.runner``) speaks only the agent bridge, so it
needs no database: the supervisor starts it with the bridge URL, passes the run's token
in its environment (not its argv, which every local user can read), keeps its output in
``<data dir>/runs/<id>/runner.log``, and reports its exit. It dies with the supervisor
(PR_SET_PDEATHSIG) and carries the supervisor's marker, so a restarted supervisor's
sweep finds any that survived.

Each run's screen is recorded beside it (``python -m sandboxes.recording``, ffmpeg into
``<data dir>/runs/<id>/screen.webm``, its messages in ``recorder.log``): started with the
runner, asked to finish (SIGTERM, so that the file gets its end) when the runner ends,
and with the sandbox or the supervisor, killed if it does not within
``RECORDER_STOP_GRACE``. A recorder that cannot start costs the run nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxes import recording

log = logging.getLogger(__name__)

#: the environment a runner inherits from the supervisor (the LLM settings among them);
#: everything else is dropped
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
PASSED_ENV_PREFIXES = ("NAMEK_LLM_",)
PR_SET_PDEATHSIG = 1
#: record each run's screen (needs Debian's ffmpeg; without it runs are not recorded)
RECORD_SCREEN = True
#: seconds a recorder has to finish its file once asked, before it is killed
RECORDER_STOP_GRACE = 10.0

ExitCallback = Callable[[int, int, str], Any]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


@dataclass
class Runner:
    run_id: int
    sandbox_id: int
    process: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = None
    killer: asyncio.Task[None] | None = None
    stopping: bool = field(default=False)


@dataclass
class Recorder:
    run_id: int
    sandbox_id: int
    process: asyncio.subprocess.Process
    done: asyncio.Task[None] | None = None
    killer: asyncio.Task[None] | None = None


class RunnerPool:
    def __init__(self, data_dir: Path, marker: str, on_exit: ExitCallback | None) -> None:
        self.runs_dir = data_dir / "runs"
        self.marker = marker
        self.data_dir = data_dir
        self.on_exit = on_exit
        self.runners: dict[int, Runner] = {}
        self.recorders: dict[int, Recorder] = {}

    def environment(self, run_id: int, sandbox_id: int, token: str, source: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in source.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)}
        env.update(
            {
                self.marker: str(self.data_dir),
                "NAMEK_SANDBOX_ID": f"run-{run_id}",
                "NAMEK_RUN_TOKEN": token,
                "PYTHONUNBUFFERED": "1",
                "TMPDIR": str(self.runs_dir / str(run_id) / "tmp"),
            }
        )
        return env

    async def start(
        self, run_id: int, sandbox_id: int, bridge_url: str, token: str, screen: tuple[str, str] | None = None
    ) -> None:
        """Launch the run's runner and, given the screen's (VNC socket, password), its recorder."""
        if run_id in self.runners:
            raise ValueError(f"run {run_id} already has a runner")
        work = self.runs_dir / str(run_id)
        (work / "tmp").mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [sys.executable, "-m", "sandboxes.agents.runner", "--bridge", bridge_url, "--work-dir", str(work)]
        root = Path(__file__).resolve().parent.parent.parent
        with open(work / "runner.log", "ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=root,
                env=self.environment(run_id, sandbox_id, token, os.environ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        runner = Runner(run_id, sandbox_id, process)
        runner.watcher = asyncio.ensure_future(self._watch(runner))
        self.runners[run_id] = runner
        log.info("run %s: runner started (pid %s)", run_id, process.pid)
        if screen is not None and RECORD_SCREEN:
            try:
                await self._start_recorder(run_id, sandbox_id, *screen)
            except Exception:
                log.exception("run %s: the screen recorder could not start", run_id)

    async def _start_recorder(self, run_id: int, sandbox_id: int, vnc_socket: str, password: str) -> None:
        if not os.access(recording.FFMPEG, os.X_OK):
            log.warning("run %s: not recorded: %s is missing (install Debian's ffmpeg)", run_id, recording.FFMPEG)
            return
        work = self.runs_dir / str(run_id)
        command = [
            sys.executable, "-m", "sandboxes.recording", "--screen", f"unix:{vnc_socket}", "--password-file", "-",
            "--out", str(work / "screen.webm"), "--fps", str(recording.FPS),
            "--max-bytes", str(recording.MAX_BYTES), "--max-seconds", str(recording.MAX_SECONDS),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        env.update({self.marker: str(self.data_dir), "NAMEK_SANDBOX_ID": f"run-{run_id}-screen"})
        with open(work / "recorder.log", "ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=Path(__file__).resolve().parent.parent.parent,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        assert process.stdin is not None
        # The password through a pipe: argv and the environment are readable by others.
        process.stdin.write(password.encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()
        recorder = Recorder(run_id, sandbox_id, process)
        recorder.done = asyncio.ensure_future(self._watch_recorder(recorder))
        self.recorders[run_id] = recorder
        log.info("run %s: screen recorder started (pid %s)", run_id, process.pid)

    async def _watch_recorder(self, recorder: Recorder) -> None:
        code = await recorder.process.wait()
        if self.recorders.get(recorder.run_id) is recorder:
            del self.recorders[recorder.run_id]
        if recorder.killer:
            recorder.killer.cancel()
        log.info("run %s: screen recorder ended (%s)", recorder.run_id, describe_exit(code))

    def stop_recorder(self, run_id: int, grace: float = RECORDER_STOP_GRACE) -> asyncio.Task[None] | None:
        """Ask the run's recorder to finish its file (SIGTERM), killed after ``grace``;
        returns what to await for its end, or None if there is none."""
        recorder = self.recorders.get(run_id)
        if recorder is None:
            return None
        if recorder.killer is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(recorder.process.pid, signal.SIGTERM)
            recorder.killer = asyncio.ensure_future(self._kill_recorder_after(recorder, grace))
        return recorder.done

    async def _kill_recorder_after(self, recorder: Recorder, grace: float) -> None:
        await asyncio.sleep(grace)
        log.warning("run %s: the screen recorder did not finish within %s s; killed", recorder.run_id, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(recorder.process.pid, signal.SIGKILL)

    async def _watch(self, runner: Runner) -> None:
        code = await runner.process.wait()
        self.runners.pop(runner.run_id, None)
        if runner.killer:
            runner.killer.cancel()
        description = describe_exit(code)
        log.info("run %s: runner ended (%s)", runner.run_id, description)
        self.stop_recorder(runner.run_id)
        if self.on_exit:
            try:
                result = self.on_exit(runner.run_id, code, description)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("recording the end of run %s failed", runner.run_id)

    def stop(self, run_id: int, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` seconds; returns at once."""
        runner = self.runners.get(run_id)
        if runner is None or runner.stopping:
            return
        runner.stopping = True
        self._signal(runner, signal.SIGTERM)
        runner.killer = asyncio.ensure_future(self._kill_after(runner, grace))

    async def _kill_after(self, runner: Runner, grace: float) -> None:
        await asyncio.sleep(grace)
        self._signal(runner, signal.SIGKILL)

    @staticmethod
    def _signal(runner: Runner, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.process.pid, signum)

    async def stop_sandbox(self, sandbox_id: int) -> None:
        """Kill the runners of a sandbox that is going (they would only fail now); its
        recorders finish their files first, while its screen is still there."""
        await self._kill(
            [r for r in self.runners.values() if r.sandbox_id == sandbox_id],
            [r for r in self.recorders.values() if r.sandbox_id == sandbox_id],
        )

    async def stop_all(self) -> None:
        await self._kill(list(self.runners.values()), list(self.recorders.values()))

    async def _kill(self, runners: list[Runner], recorders: list[Recorder]) -> None:
        finishing = [self.stop_recorder(r.run_id) for r in recorders]
        for runner in runners:
            self._signal(runner, signal.SIGKILL)
        waits = [r.watcher for r in runners if r.watcher] + [task for task in finishing if task is not None]
        if waits:
            await asyncio.wait(waits, timeout=10 + RECORDER_STOP_GRACE)

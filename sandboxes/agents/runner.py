"""The agent runner: one browser-use agent, driven by Namek over the agent bridge.

Run as::

    python -m sandboxes.agents.runner --bridge ws://HOST/ws/agent/<run_id>/ [--token <run token>]
        [--script FILE] [--base-url URL] [--cdp-url URL] [--work-dir DIR] [--max-steps N] [--verbose]

The token may instead come from ``$NAMEK_RUN_TOKEN`` (argv is visible to every local user).

It speaks only this protocol with Namek: JSON text frames on one websocket opened with the
header ``Authorization: Bearer <run token>``.

agent → Namek::

    {"type": "hello", "agent": "browser-use 0.13.14"}                  first, once
    {"type": "status", "status": "running"}                            after the welcome, and after a resume
    {"type": "event", "kind": "agent.log", "text": "..."}              a few log lines
    {"type": "event", "kind": "agent.step", "text": "<goal>",          after every step that ran
     "data": {"step": n, "goal", "thinking", "evaluation", "actions": [{"name", "params"}],
              "url", "title", "error"?},
     "screenshot": "<base64>", "screenshot_type": "png" | "jpeg"}    (≤ 2.5 MiB decoded, data ≤ 12 KiB)
    {"type": "ack", "id": N, "command": "pause" | "resume" | "stop"}
    {"type": "status", "status": "paused"}                             once the agent is at rest
    {"type": "status", "status": "done", "result": "..."}              last
    {"type": "status", "status": "failed", "error": "..."}             last

Namek → agent::

    {"type": "welcome", "run": ID, "sandbox": ID, "task": "...", "cdp_url": "ws://...",
     "script": "<step file text>" | null, "base_url": "http://..." | null}   answers the hello
    {"type": "pause", "id": N}      ack and "paused" come once the step in flight has finished
    {"type": "resume", "id": N, "note": "..."}   the note is added to the agent's task
    {"type": "stop", "id": N}       ack, then the final status ("stopped by Namek"), then exit

The welcome's ``script`` and ``base_url`` win over ``--script`` and ``--base-url``;
``--cdp-url`` wins over the welcome's ``cdp_url`` (tests, local use). browser-use sends the
run token as an ``Authorization`` header on the CDP websocket too (``BrowserProfile.headers``),
but only to the welcome's ``cdp_url``, never to a ``--cdp-url``.

SIGTERM or SIGINT stop the agent as a stop command does (final status "terminated by
SIGTERM"); an agent that does not reach a checkpoint within 10 s is cancelled.

With a step file the scripted model plays it; otherwise the LLM comes from the environment
(``sandboxes.agents.llm``). Exit codes: 0 done, 1 failed (or stopped), 2 bad arguments,
step file or configuration, 3 the bridge could not be reached or was lost (the agent is stopped).

The runner never touches Namek's database and imports no Django: it also runs in a
sandbox pod. browser-use's config and temporary files live in the work directory, with
``model-inputs.jsonl``: every message list the model was given, one JSON line per call
(``{"at", "structured", "messages": [{"role", "text"}]}``, text only).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxes.agents import prepare_browser_use_env
from sandboxes.agents.steps import StepFile, StepFileError, load_step_file, parse_step_file

if TYPE_CHECKING:
    from browser_use import Agent
    from browser_use.agent.views import AgentHistory
    from browser_use.browser import BrowserSession
    from websockets.asyncio.client import ClientConnection

    from sandboxes.agents.scripted import ScriptedModel

logger = logging.getLogger("sandboxes.agents.runner")

TOKEN_ENV = "NAMEK_RUN_TOKEN"

#: consecutive failed steps (a model error included) before an LLM run gives up
LLM_MAX_FAILURES = 3

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BRIDGE_LOST = 3

# Namek's bridge takes screenshots up to 2.5 MiB decoded: base64 and JSON must stay under
# Daphne's 4 MiB frame limit. Step data is stored only up to 16 KiB of JSON; Namek adds to it.
MAX_SCREENSHOT_BYTES = int(2.5 * 1024 * 1024)
MAX_STEP_DATA_BYTES = 12 * 1024
MAX_STATUS_TEXT = 4000
MAX_FRAME_BYTES = 4 * 1024 * 1024  # what we accept from Namek: the welcome carries a step file (≤ 1 MiB)
LLM_MAX_STEPS = 50
SCRIPT_EXTRA_STEPS = 5
WELCOME_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0  # how long a stopped agent may take to reach a checkpoint
BROWSER_CALL_TIMEOUT = 10.0


def agent_name() -> str:
    try:
        return f"browser-use {importlib.metadata.version('browser-use')}"
    except importlib.metadata.PackageNotFoundError:
        return "browser-use"


# -- agent control, shared with tests ----------------------------------------------------------


def pause_agent(agent: Agent) -> None:
    """Ask the agent to stop at its next checkpoint (browser-use prints a console banner: hidden)."""
    with contextlib.redirect_stdout(io.StringIO()):
        agent.pause()


async def resume_agent(agent: Agent, note: str | None = None) -> None:
    """Resume a paused agent; a note is added to its task, so the model's next input has it."""
    if note:
        # add_new_task() replaces the agent's event bus with one of the same name; stop and
        # drop the old one first, or bubus warns about the duplicate and leaks its task.
        old_bus = agent.eventbus
        with contextlib.suppress(Exception):
            await old_bus.stop(clear=True, timeout=1.0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*EventBus with name", category=UserWarning)
            agent.add_new_task(note)
    with contextlib.redirect_stdout(io.StringIO()):
        agent.resume()


def stop_agent(agent: Agent) -> None:
    agent.stop()


async def disconnect_browser(session: BrowserSession) -> None:
    """Drop browser-use's CDP connection without closing the (sandbox's) browser."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(session.reset(), timeout=BROWSER_CALL_TIMEOUT)


async def page_location(session: BrowserSession) -> tuple[str, str]:
    """The agent tab's URL and title now (browser-use's cached target info lags behind)."""
    cdp = await session.get_or_create_cdp_session()
    answer = await cdp.cdp_client.send.Runtime.evaluate(
        params={"expression": "[location.href, document.title]", "returnByValue": True}, session_id=cdp.session_id
    )
    url, title = answer["result"]["value"]
    return str(url), str(title)


def fit_data(data: dict[str, Any], limit: int = MAX_STEP_DATA_BYTES) -> dict[str, Any]:
    """``data`` as plain JSON of at most ``limit`` bytes: long strings (an LLM's thinking) are cut."""
    plain = json.loads(json.dumps(data, default=str))
    for cap in (2000, 500, 120, 30):
        shrunk = _cut_strings(plain, cap)
        if len(json.dumps(shrunk).encode()) <= limit:
            return dict(shrunk)
    return {key: _cut_strings(plain.get(key), 200) for key in ("step", "url", "title")} | {"truncated": True}


def _cut_strings(value: Any, cap: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= cap else value[: cap - 1] + "…"
    if isinstance(value, dict):
        return {key: _cut_strings(item, cap) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut_strings(item, cap) for item in value[:50]]
    return value


def _cut(text: str, limit: int = MAX_STATUS_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_model_inputs(llm: Any, path: Path) -> None:
    """Append every message list the model is given to ``path`` (JSON lines, text only)."""
    original = llm.ainvoke

    async def recording_ainvoke(messages: list[Any], output_format: Any = None, **kwargs: Any) -> Any:
        line = {
            "at": time.time(),
            "structured": output_format is not None,
            "messages": [{"role": message.role, "text": message.text} for message in messages],
        }
        with contextlib.suppress(OSError), path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        return await original(messages, output_format, **kwargs)

    object.__setattr__(llm, "ainvoke", recording_ainvoke)  # before the Agent wraps it for token counting


# -- screenshots -------------------------------------------------------------------------------


async def capture_screenshot(session: BrowserSession, limit: int = MAX_SCREENSHOT_BYTES) -> tuple[bytes, str] | None:
    """A screenshot of the agent's tab through browser-use's own session, at most ``limit`` bytes.

    PNG when it fits, else JPEG, else a half-size JPEG; None when the browser does not answer.
    """
    attempts: list[tuple[str, int | None, float]] = [("png", None, 1.0), ("jpeg", 80, 1.0), ("jpeg", 60, 0.5)]
    for image_format, quality, scale in attempts:
        try:
            if scale == 1.0:
                data = await asyncio.wait_for(
                    session.take_screenshot(format=image_format, quality=quality), timeout=BROWSER_CALL_TIMEOUT
                )
            else:
                data = await asyncio.wait_for(
                    _scaled_screenshot(session, image_format, quality, scale), timeout=BROWSER_CALL_TIMEOUT
                )
        except Exception as exc:
            logger.warning("No screenshot: %s: %s", type(exc).__name__, exc)
            return None
        if len(data) <= limit:
            return data, image_format
    logger.warning("No screenshot: even a half-size JPEG is larger than %s bytes", limit)
    return None


async def _scaled_screenshot(session: BrowserSession, image_format: str, quality: int | None, scale: float) -> bytes:
    cdp = await session.get_or_create_cdp_session()
    metrics = await cdp.cdp_client.send.Page.getLayoutMetrics(session_id=cdp.session_id)
    viewport = metrics.get("cssVisualViewport") or metrics.get("cssLayoutViewport") or {}
    params: dict[str, Any] = {
        "format": image_format,
        "clip": {
            "x": viewport.get("pageX", 0),
            "y": viewport.get("pageY", 0),
            "width": viewport.get("clientWidth", 1280),
            "height": viewport.get("clientHeight", 800),
            "scale": scale,
        },
    }
    if quality is not None:
        params["quality"] = quality
    result = await cdp.cdp_client.send.Page.captureScreenshot(params=params, session_id=cdp.session_id)  # type: ignore[arg-type]
    return base64.b64decode(result["data"])


# -- the bridge --------------------------------------------------------------------------------


class BridgeLost(Exception):
    pass


class Bridge:
    """The websocket to Namek: JSON objects in and out, one writer at a time."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        async with self._lock:
            try:
                await self.connection.send(json.dumps(message))
            except ConnectionClosed as exc:
                raise BridgeLost(str(exc)) from exc

    async def receive(self) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                raw = await self.connection.recv()
            except ConnectionClosed as exc:
                raise BridgeLost(str(exc)) from exc
            try:
                message = json.loads(raw)
            except (TypeError, ValueError):
                logger.warning("Ignoring a frame that is not JSON")
                continue
            if isinstance(message, dict):
                return message
            logger.warning("Ignoring a JSON frame that is not an object")

    async def status(self, status: str, **fields: Any) -> None:
        await self.send({"type": "status", "status": status, **fields})

    async def log(self, text: str) -> None:
        await self.send({"type": "event", "kind": "agent.log", "text": text})


# -- one run -----------------------------------------------------------------------------------


class AgentRun:
    """Runs one agent, turning its step hooks into events and Namek's commands into control calls."""

    def __init__(self, bridge: Bridge, agent: Agent, model: ScriptedModel | None, max_steps: int) -> None:
        self.bridge = bridge
        self.agent = agent
        self.model = model
        self.max_steps = max_steps
        self.in_step = False
        self.stop_reason: str | None = None  # why the run was stopped from outside
        self.reported = 0  # agent history items already sent as agent.step events
        self.step_number = 0
        self._pending_pauses: list[Any] = []
        self._run_task: asyncio.Task[Any] | None = None

    async def on_step_start(self, agent: Agent) -> None:
        self.in_step = True

    async def on_step_end(self, agent: Agent) -> None:
        """After every step, run or interrupted: report what ran, then settle pauses."""
        try:
            history = agent.history.history
            for item in history[self.reported :]:
                if item.model_output is not None:
                    await self.send_step(item)
            self.reported = len(history)
        finally:
            self.in_step = False
            if self._pending_pauses and agent.state.paused:
                await self._settle_pauses(announce=True)

    async def send_step(self, item: AgentHistory) -> None:
        session = self.agent.browser_session
        assert session is not None and item.model_output is not None
        output = item.model_output
        self.step_number += 1
        actions = []
        for action in output.action:
            dumped = action.model_dump(exclude_unset=True)
            for name, params in dumped.items():
                actions.append({"name": name, "params": params if isinstance(params, dict) else {}})
        url, title = item.state.url, item.state.title
        with contextlib.suppress(Exception):
            url, title = await asyncio.wait_for(page_location(session), timeout=BROWSER_CALL_TIMEOUT)
        data: dict[str, Any] = {
            "step": self.step_number,
            "goal": output.next_goal,
            "thinking": output.thinking,
            "evaluation": output.evaluation_previous_goal,
            "actions": actions,
            "url": url,
            "title": title,
        }
        errors = [str(result.error) for result in item.result if result.error]
        if errors:
            data["error"] = "; ".join(errors)
        text = output.next_goal or ", ".join(action["name"] for action in actions) or f"Step {self.step_number}"
        message: dict[str, Any] = {"type": "event", "kind": "agent.step", "text": text, "data": fit_data(data)}
        shot = await capture_screenshot(session)
        if shot is not None:
            message["screenshot"] = base64.b64encode(shot[0]).decode("ascii")
            message["screenshot_type"] = shot[1]
        await self.bridge.send(message)

    async def _settle_pauses(self, *, announce: bool) -> None:
        pending, self._pending_pauses = self._pending_pauses, []
        for command_id in pending:
            await self.bridge.send({"type": "ack", "id": command_id, "command": "pause"})
        if announce and not self.agent.history.is_done():
            await self.bridge.status("paused")

    async def read_commands(self) -> str:
        """Handle Namek's commands until a stop ("stop") or the bridge goes away ("lost")."""
        while True:
            try:
                message = await self.bridge.receive()
            except BridgeLost:
                return "lost"
            kind = message.get("type")
            command_id = message.get("id")
            try:
                if kind == "pause":
                    await self.pause(command_id)
                elif kind == "resume":
                    note = message.get("note")
                    await self.resume(command_id, note if isinstance(note, str) else None)
                elif kind == "stop":
                    await self.stop(command_id)
                    return "stop"
                else:
                    logger.warning("Ignoring an unknown command %r", kind)
            except BridgeLost:
                return "lost"

    async def pause(self, command_id: Any) -> None:
        if self.agent.history.is_done():
            await self.bridge.send({"type": "ack", "id": command_id, "command": "pause"})
            return
        pause_agent(self.agent)
        self._pending_pauses.append(command_id)
        if not self.in_step:
            # Between steps (or before the first): the run loop waits before starting another.
            await self._settle_pauses(announce=True)

    async def resume(self, command_id: Any, note: str | None) -> None:
        await self._settle_pauses(announce=False)  # a pause that never came to rest
        await resume_agent(self.agent, note)
        await self.bridge.send({"type": "ack", "id": command_id, "command": "resume"})
        if not self.agent.history.is_done():
            await self.bridge.status("running")

    async def stop(self, command_id: Any) -> None:
        await self._settle_pauses(announce=False)
        self.stop_reason = "stopped by Namek"
        stop_agent(self.agent)
        await self.bridge.send({"type": "ack", "id": command_id, "command": "stop"})

    def terminate(self, signum: int) -> None:
        """SIGTERM or SIGINT: stop like a stop command, and report it."""
        logger.warning("Got %s: stopping the agent", signal.Signals(signum).name)
        self.stop_reason = self.stop_reason or f"terminated by {signal.Signals(signum).name}"
        stop_agent(self.agent)
        run_task = self._run_task
        if run_task is not None:
            asyncio.get_running_loop().call_later(STOP_GRACE_SECONDS, run_task.cancel)

    async def run(self) -> tuple[int, dict[str, Any] | None]:
        """(exit code, final status message or None when the bridge is gone)."""
        run_task = self._run_task = asyncio.create_task(
            self.agent.run(max_steps=self.max_steps, on_step_start=self.on_step_start, on_step_end=self.on_step_end)
        )
        reader = asyncio.create_task(self.read_commands())
        bridge_lost = False
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.terminate, signum)
        try:
            done, _ = await asyncio.wait({run_task, reader}, return_when=asyncio.FIRST_COMPLETED)
            if run_task not in done:
                bridge_lost = reader.result() == "lost"
                if bridge_lost:
                    logger.warning("The bridge to Namek is gone: stopping the agent")
                    stop_agent(self.agent)
                try:
                    await asyncio.wait_for(asyncio.shield(run_task), timeout=STOP_GRACE_SECONDS)
                except TimeoutError:
                    logger.warning("The agent did not stop within %s s: cancelling it", STOP_GRACE_SECONDS)
                    run_task.cancel()
                except Exception:
                    pass  # reported below from run_task
            await asyncio.gather(run_task, return_exceptions=True)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self.agent.browser_session is not None:
                await disconnect_browser(self.agent.browser_session)
        if bridge_lost:
            return EXIT_BRIDGE_LOST, None
        return self.outcome(run_task)

    def outcome(self, run_task: asyncio.Task[Any]) -> tuple[int, dict[str, Any]]:
        code, final = self._outcome(run_task)
        for key in ("result", "error"):
            if key in final:
                final[key] = _cut(str(final[key]))
        return code, final

    def _outcome(self, run_task: asyncio.Task[Any]) -> tuple[int, dict[str, Any]]:
        history = self.agent.history
        if not run_task.cancelled() and run_task.exception() is not None:
            error = run_task.exception()
            text = f"{type(error).__name__}: {error}"
            if not history.history:
                text = f"browser-use could not work with the browser at {self.agent.browser_session.cdp_url}: {text}"
            return EXIT_FAILED, {"type": "status", "status": "failed", "error": text}
        if self.model is not None and self.model.failure is not None:
            return EXIT_FAILED, {"type": "status", "status": "failed", "error": self.model.failure}
        if history.is_done():
            result = history.final_result() or ""
            if history.is_successful() is False:
                return EXIT_FAILED, {"type": "status", "status": "failed", "error": result or "The agent gave up"}
            return EXIT_DONE, {"type": "status", "status": "done", "result": result}
        if self.stop_reason is not None:
            return EXIT_FAILED, {"type": "status", "status": "failed", "error": self.stop_reason}
        errors = [error for error in history.errors() if error]
        error = errors[-1] if errors else f"The agent did not finish within {self.max_steps} steps"
        if errors and self.model is None:  # an LLM drives: say which one failed
            where = os.environ.get("NAMEK_LLM_BASE_URL") or os.environ.get("NAMEK_LLM_PROVIDER") or "openai"
            error = f"the LLM {os.environ.get('NAMEK_LLM_MODEL', '?')} at {where} failed: {error}"
        return EXIT_FAILED, {"type": "status", "status": "failed", "error": error}


# -- setting up --------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad arguments, step file or configuration: exit code 2."""


def _choose(welcome_value: Any, cli_value: str | None) -> str | None:
    return welcome_value if isinstance(welcome_value, str) and welcome_value.strip() else cli_value


def load_script(welcome: dict[str, Any], cli_path: str | None) -> StepFile | None:
    try:
        text = welcome.get("script")
        if isinstance(text, str) and text.strip():
            return parse_step_file(text)
        if cli_path:
            return load_step_file(cli_path)
    except StepFileError as exc:
        raise UsageError(f"step file: {exc}") from exc
    return None


def build_agent(
    *,
    task: str,
    cdp_url: str,
    headers: dict[str, str] | None,
    script: StepFile | None,
    base_url: str | None,
    work_dir: Path,
    max_steps: int | None,
) -> tuple[Agent, ScriptedModel | None, int]:
    from browser_use import Agent, Browser

    from sandboxes.agents.llm import chat_model_from_env
    from sandboxes.agents.scripted import ScriptedModel

    browser = Browser(
        cdp_url=cdp_url,
        headers=headers,
        keep_alive=True,
        headless=False,  # keep the sandbox's own window size
        downloads_path=str(work_dir / "downloads"),
    )
    common: dict[str, Any] = {
        "task": task,
        "browser": browser,
        "use_judge": False,
        "enable_signal_handler": False,
        "calculate_cost": False,
        "file_system_path": str(work_dir / "files"),
    }
    inputs = work_dir / "model-inputs.jsonl"
    if script is not None:
        model = ScriptedModel(script, base_url=base_url)
        record_model_inputs(model, inputs)
        agent = Agent(
            llm=model,
            use_vision=False,  # the scripted model reads the selector map, not pictures
            directly_open_url=False,  # a URL in the task text is not a step
            message_compaction=False,
            enable_planning=False,
            loop_detection_enabled=False,
            **common,
        )
        model.attach(agent)
        return agent, model, max_steps or len(script.steps) + SCRIPT_EXTRA_STEPS
    try:
        llm = chat_model_from_env(os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if llm is None:
        raise UsageError("no step file and no LLM configured (set NAMEK_LLM_PROVIDER / NAMEK_LLM_MODEL)")
    record_model_inputs(llm, inputs)
    return Agent(llm=llm, max_failures=LLM_MAX_FAILURES, **common), None, max_steps or LLM_MAX_STEPS


async def run(args: argparse.Namespace, work_dir: Path) -> int:
    from websockets.asyncio.client import connect

    try:
        connection = await connect(
            args.bridge,
            additional_headers={"Authorization": f"Bearer {args.token}"},
            max_size=MAX_FRAME_BYTES,
            open_timeout=WELCOME_TIMEOUT,
        )
    except Exception as exc:
        logger.error("Cannot reach the bridge %s: %s: %s", args.bridge, type(exc).__name__, exc)
        return EXIT_BRIDGE_LOST
    bridge = Bridge(connection)
    try:
        return await _run_connected(args, work_dir, bridge)
    except BridgeLost as exc:
        logger.error("The bridge to Namek is gone: %s", exc)
        return EXIT_BRIDGE_LOST
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=5)


async def _run_connected(args: argparse.Namespace, work_dir: Path, bridge: Bridge) -> int:
    await bridge.send({"type": "hello", "agent": agent_name()})
    try:
        welcome = await asyncio.wait_for(bridge.receive(), timeout=WELCOME_TIMEOUT)
    except TimeoutError:
        logger.error("No welcome from Namek within %s s", WELCOME_TIMEOUT)
        return EXIT_BRIDGE_LOST
    if welcome.get("type") != "welcome":
        logger.error("Expected a welcome, got %r", welcome.get("type"))
        await bridge.status("failed", error=f"expected a welcome, got {welcome.get('type')!r}")
        return EXIT_FAILED
    try:
        script = load_script(welcome, args.script)
        cdp_url = args.cdp_url or welcome.get("cdp_url")
        if not isinstance(cdp_url, str) or not cdp_url:
            raise UsageError("no CDP URL: neither the welcome nor --cdp-url gives one")
        # The run token goes to Namek's CDP endpoint only, never to a --cdp-url given by hand.
        headers = None if args.cdp_url else {"Authorization": f"Bearer {args.token}"}
        task = _choose(welcome.get("task"), None) or (script.describe_task() if script else None)
        if not task:
            raise UsageError("no task: the welcome gives none and there is no step file")
        base_url = _choose(welcome.get("base_url"), args.base_url)
        agent, model, max_steps = build_agent(
            task=task,
            cdp_url=cdp_url,
            headers=headers,
            script=script,
            base_url=base_url,
            work_dir=work_dir,
            max_steps=args.max_steps,
        )
    except UsageError as exc:
        logger.error("%s", exc)
        await bridge.status("failed", error=str(exc))
        return EXIT_USAGE

    await bridge.status("running")
    if script is not None:
        title = f" {script.name!r}" if script.name else ""
        count = len(script.steps)
        await bridge.log(f"{agent_name()}: playing the step file{title} ({count} step{'' if count == 1 else 's'})")
    else:
        await bridge.log(f"{agent_name()}: {agent.llm.provider} model {agent.llm.model}")
    agent_run = AgentRun(bridge, agent, model, max_steps)
    code, final = await agent_run.run()
    if final is not None:
        await bridge.send(final)
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sandboxes.agents.runner",
        description="Run one browser-use agent for Namek, over the agent bridge.",
    )
    parser.add_argument("--bridge", required=True, help="the agent bridge websocket URL (ws:// or wss://)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"the run token, sent as a bearer token (default: ${TOKEN_ENV}, which other users cannot read)",
    )
    parser.add_argument("--script", help="a step file to play (the welcome's script wins)")
    parser.add_argument("--base-url", help="what step-file paths are joined to (the welcome's base_url wins)")
    parser.add_argument("--cdp-url", help="connect to this CDP URL instead of the welcome's (no token sent)")
    parser.add_argument(
        "--work-dir", help="browser-use's files and model-inputs.jsonl (default: a temp dir, removed at exit)"
    )
    parser.add_argument("--max-steps", type=int, help="step budget (default: steps + 5 for scripts, 50 for LLMs)")
    parser.add_argument("--verbose", action="store_true", help="log browser-use's own lines too")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error(f"the run token is missing: give --token or set {TOKEN_ENV}")
    if not args.bridge.startswith(("ws://", "wss://")):
        parser.error("--bridge must be a ws:// or wss:// URL")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # exits with 2 on bad arguments
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("browser_use", "cdp_use", "bubus", "httpx", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.work_dir:
        work_dir = Path(args.work_dir).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="namek-agent-"))
        remove = True
    try:
        prepare_browser_use_env(work_dir / "config", work_dir / "tmp")
        return asyncio.run(run(args, work_dir))
    except KeyboardInterrupt:
        return EXIT_FAILED
    finally:
        if remove:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

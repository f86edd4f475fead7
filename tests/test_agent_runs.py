"""Agent runs for real: the runner launched by the supervisor, browser-use driving the
sandbox's Chromium through Namek's CDP relay, the scripted model playing the demo step
files on the built-in demo site, steps arriving in the event log.

No LLM runs here (none is reachable): the scripted model stands in for it, through the
same browser-use loop.

Bad input tried: a runner killed with SIGKILL mid-run (the run fails with the reason and
the sandbox stays usable), a step whose target does not exist (the run fails naming the
step).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.live import LiveNamek, free_port, processes_with, ready_sandbox, running

pytestmark = [pytest.mark.processes, pytest.mark.browser]


@pytest.fixture
def box(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    with ready_sandbox(live_namek, name="agent") as created:
        yield created


def start(namek: LiveNamek, sandbox_id: int, **body: Any) -> dict[str, Any]:
    status, run = namek.api("POST", f"/api/sandboxes/{sandbox_id}/runs", body=body)
    assert status == 201, run
    return run


def wait_run(namek: LiveNamek, run_id: int, statuses: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = namek.api("GET", f"/api/runs/{run_id}")[1]
        if run["status"] in statuses:
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not {statuses} after {timeout} s: {run}")


def agent_events(namek: LiveNamek, sandbox_id: int, run_id: int) -> list[dict[str, Any]]:
    found, after = [], 0
    while True:
        page = namek.api("GET", f"/api/sandboxes/{sandbox_id}/events?after={after}&limit=1000")[1]
        found += [e for e in page["events"] if e["kind"].startswith("agent.") and e["data"].get("run") == run_id]
        if not page["events"]:
            return found
        after = page["next_after"]


def wait_event(namek: LiveNamek, sandbox_id: int, run_id: int, kind: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in agent_events(namek, sandbox_id, run_id):
            if event["kind"] == kind:
                return event
        time.sleep(0.3)
    raise AssertionError(f"no {kind} of run {run_id} within {timeout} s")


async def page_state(namek: LiveNamek, sandbox_id: int, script: str) -> Any:
    """Evaluate ``script`` in the sandbox's demo tab, read over CDP through Namek."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.connect_over_cdp(
            f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/cdp/", headers={"Authorization": f"Bearer {namek.token()}"}
        )
        try:
            pages = [p for context in browser.contexts for p in context.pages if "/demo/" in p.url]
            assert pages, [p.url for context in browser.contexts for p in context.pages]
            return await pages[-1].evaluate(script)
        finally:
            await browser.close()


def test_a_scripted_agent_fills_the_demo_quote_form(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    run = start(live_namek, box["id"], demo="quote")
    assert (run["status"], run["scripted"]) == ("pending", True)
    run = wait_run(live_namek, run["id"], ("done", "failed"))
    assert run["status"] == "done", run
    logged = agent_events(live_namek, box["id"], run["id"])
    kinds = [e["kind"] for e in logged]
    assert kinds[0] == "agent.started" and kinds[-1] == "agent.done"
    steps = [e for e in logged if e["kind"] == "agent.step"]
    assert [e["data"]["step"] for e in steps] == list(range(1, len(steps) + 1))
    assert len(steps) >= 10
    assert all(e["screenshot_url"] and e["thumbnail_url"] for e in steps)
    actions = [a["name"] for e in steps for a in e["data"]["actions"]]
    assert {"navigate", "input", "click", "select_dropdown"} <= set(actions), actions
    # The page, read over CDP: the quote was really submitted with what was typed.
    text = asyncio.run(page_state(live_namek, box["id"], "document.body.innerText"))
    assert "Quote request received" in text
    for shown in ("ada@example.com", "Desk lamp", "Quantity\n20", "Express delivery\nYes"):
        assert shown in text, (shown, text)


def test_pause_holds_the_page_and_resume_brings_the_note(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    script = (Path(__file__).resolve().parent.parent / "demo" / "quote.yaml").read_text()
    run = start(live_namek, box["id"], script=script, task="Request a quote")
    wait_event(live_namek, box["id"], run["id"], "agent.step")
    status, _ = live_namek.api("POST", f"/api/runs/{run['id']}/pause")
    assert status == 200
    wait_event(live_namek, box["id"], run["id"], "agent.paused")
    steps_then = len([e for e in agent_events(live_namek, box["id"], run["id"]) if e["kind"] == "agent.step"])
    before = asyncio.run(page_state(live_namek, box["id"], "[location.href, document.body.innerText]"))
    time.sleep(2.5)
    after = asyncio.run(page_state(live_namek, box["id"], "[location.href, document.body.innerText]"))
    assert after == before, "the page changed while the agent was paused"
    steps_now = len([e for e in agent_events(live_namek, box["id"], run["id"]) if e["kind"] == "agent.step"])
    assert steps_now == steps_then
    status, _ = live_namek.api("POST", f"/api/runs/{run['id']}/resume", body={"note": "NOTE-4242: use the blue lamp"})
    assert status == 200
    resumed = wait_event(live_namek, box["id"], run["id"], "agent.resumed")
    assert resumed["data"]["note"] == "NOTE-4242: use the blue lamp"
    run = wait_run(live_namek, run["id"], ("done", "failed"))
    assert run["status"] == "done", run
    # What the model was given after the resume, as the runner recorded it.
    inputs = live_namek.data_dir / "runs" / str(run["id"]) / "model-inputs.jsonl"
    calls = [json.loads(line) for line in inputs.read_text().splitlines()]
    resumed_at = next(i for i, call in enumerate(calls) if "NOTE-4242" in json.dumps(call))
    assert resumed_at > 0, "the note reached the model only after the resume"


def test_a_missing_target_fails_the_run_naming_the_step(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    script = 'steps:\n  - navigate: /demo/quote\n  - click: {target: {text: "No such button anywhere"}}\n'
    run = wait_run(live_namek, start(live_namek, box["id"], script=script, task="break")["id"], ("done", "failed"))
    assert run["status"] == "failed"
    assert "step 2" in run["error"] and "No such button anywhere" in run["error"], run["error"]


def test_a_killed_runner_fails_its_run_and_the_sandbox_stays_usable(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    script = "steps:\n  - navigate: /demo/\n  - wait: {seconds: 30}\n  - done: {text: too late}\n"
    run = start(live_namek, box["id"], script=script, task="wait")
    wait_event(live_namek, box["id"], run["id"], "agent.step")
    pids = runner_pids(live_namek, run["id"])
    assert pids, "the runner carries its run in its environment"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run = wait_run(live_namek, run["id"], ("done", "failed"), timeout=30)
    assert run["status"] == "failed" and "SIGKILL" in run["error"], run
    assert run["exit_code"] == -9
    assert live_namek.api("GET", f"/api/sandboxes/{box['id']}")[1]["phase"] == "ready"
    again = start(live_namek, box["id"], demo="login")
    assert wait_run(live_namek, again["id"], ("done", "failed"))["status"] == "done"


def runner_pids(namek: LiveNamek, run_id: int) -> list[int]:
    """The supervisor marks a run's runner with ``NAMEK_SANDBOX_ID=run-<id>``."""
    return processes_with(f"NAMEK_SANDBOX_ID=run-{run_id}")


def test_stopping_a_run_ends_its_runner(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    script = "steps:\n  - navigate: /demo/\n  - wait: {seconds: 30}\n  - done: {text: too late}\n"
    run = start(live_namek, box["id"], script=script, task="wait")
    wait_event(live_namek, box["id"], run["id"], "agent.step")
    status, stopped = live_namek.api("POST", f"/api/runs/{run['id']}/stop")
    assert status == 200 and stopped["status"] == "failed" and stopped["error"] == "stopped by owner"
    deadline = time.monotonic() + 20
    while runner_pids(live_namek, run["id"]):
        assert time.monotonic() < deadline, "the runner outlived its stop"
        time.sleep(0.2)


class GarbageLLM(http.server.BaseHTTPRequestHandler):
    """An "OpenAI-compatible" endpoint that answers every request with nonsense."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html>certainly not a completion</html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_an_unreachable_or_garbage_llm_fails_the_run_with_a_reason(tmp_path: Path) -> None:
    """browser-use retries a failing model a few times: this takes a minute or two."""
    port = free_port()
    env = {"NAMEK_LLM_MODEL": "gpt-test", "NAMEK_LLM_BASE_URL": f"http://127.0.0.1:{port}/v1", "NAMEK_LLM_API_KEY": "x"}
    with running(tmp_path, **env) as namek, ready_sandbox(namek, name="llm") as created:
        unreachable = start(namek, created["id"], task="Find the desk lamp on the demo site")
        assert not unreachable["scripted"] and unreachable["model"] == "gpt-test"
        unreachable = wait_run(namek, unreachable["id"], ("done", "failed"), timeout=180)
        assert unreachable["status"] == "failed" and unreachable["error"], unreachable
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), GarbageLLM)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            garbage = start(namek, created["id"], task="Find the desk lamp on the demo site")
            garbage = wait_run(namek, garbage["id"], ("done", "failed"), timeout=180)
        finally:
            server.shutdown()
            server.server_close()
        assert garbage["status"] == "failed" and garbage["error"], garbage
        assert namek.api("GET", f"/api/sandboxes/{created['id']}")[1]["phase"] == "ready"
    assert f"the LLM gpt-test at http://127.0.0.1:{port}/v1 failed" in unreachable["error"]
    assert "Connection error" in unreachable["error"]
    assert f"the LLM gpt-test at http://127.0.0.1:{port}/v1 failed" in garbage["error"]


def test_deleting_the_sandbox_ends_its_run_and_runner(live_namek: LiveNamek) -> None:
    created = live_namek.create_sandbox(name="short agent")
    script = "steps:\n  - navigate: /demo/\n  - wait: {seconds: 30}\n  - done: {text: too late}\n"
    run = start(live_namek, created["id"], script=script, task="wait")
    wait_event(live_namek, created["id"], run["id"], "agent.step")
    assert runner_pids(live_namek, run["id"])
    live_namek.delete_sandbox(created["id"])
    run = live_namek.api("GET", f"/api/runs/{run['id']}")[1]
    assert run["status"] == "failed" and "stopping" in run["error"], run
    assert runner_pids(live_namek, run["id"]) == []


def test_run_agent_plays_a_script_from_the_command_line(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    done = live_namek.manage("run_agent", str(box["id"]), "--demo", "login", timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agent.started" in done.stdout and "agent.step" in done.stdout and ": done" in done.stdout
    for args, message in [
        (["999999", "--demo", "login"], "no sandbox 999999"),
        ([str(box["id"]), "--demo", "nope"], "demo: one of"),
        ([str(box["id"]), "--script", "/nonexistent.yaml"], "cannot read"),
        ([str(box["id"]), "--task", "no model"], "no LLM is configured"),
    ]:
        refused = live_namek.manage("run_agent", *args, check=False)
        assert refused.returncode != 0 and message in refused.stderr, (args, refused.stderr)

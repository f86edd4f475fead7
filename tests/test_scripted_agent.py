"""The scripted model and the agent runner, against Debian's Chromium and a real browser-use loop.

Step files are checked without a browser. Everything else runs browser-use's own agent on a
real Chromium serving tests/fixtures/agent_site. The runner tests play Namek's side of the
agent bridge with a small websockets server: a test double of the protocol in
sandboxes/agents/runner.py, not Namek's bridge. No LLM is called anywhere.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import functools
import http.server
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes.agents import prepare_browser_use_env
from sandboxes.agents.steps import MAX_BYTES, StepFileError, load_step_file, parse_step_file

# browser-use reads its environment when first imported: offline, config in a throwaway dir.
_CONFIG_DIR = tempfile.mkdtemp(prefix="namek-test-browser-use-")
atexit.register(shutil.rmtree, _CONFIG_DIR, True)
if "browser_use" not in sys.modules:
    prepare_browser_use_env(_CONFIG_DIR)

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "fixtures" / "agent_site"
CHROMIUM = "/usr/bin/chromium"

QUOTE_SCRIPT = """
name: Request a quote
task: Request a quote for 20 desk lamps delivered express
steps:
  - navigate: /form.html
    goal: Open the quote form
  - type: {target: {label: "Full name"}, text: "Ada Lovelace"}
    thought: The name field comes first
  - type: {target: {label: "you@example.com"}, text: "ada@example.com"}
  - select: {target: {label: "Product"}, option: "Desk lamp"}
  - type: {target: {css: "form #quantity"}, text: 20}
  - click: {target: {role: checkbox, name: "Express delivery"}}
  - scroll: {direction: down, pages: 1}
  - scroll: {direction: up, pages: 1}
  - click: {target: {text: "Send request"}}
"""


# -- step files (no browser) -------------------------------------------------------------------


def test_a_step_file_parses_into_steps() -> None:
    script = parse_step_file(QUOTE_SCRIPT)
    assert script.name == "Request a quote"
    assert script.task == "Request a quote for 20 desk lamps delivered express"
    assert [step.action for step in script.steps] == [
        "navigate",
        "type",
        "type",
        "select",
        "type",
        "click",
        "scroll",
        "scroll",
        "click",
    ]
    assert not script.ends_with_done
    assert script.steps[0].goal == "Open the quote form"
    assert script.steps[1].thought == "The name field comes first"
    assert script.steps[4].text == "20"  # a YAML number is typed as text
    assert script.steps[4].target is not None and script.steps[4].target.kind == "css"
    assert script.steps[5].target is not None and script.steps[5].target.name == "Express delivery"
    assert script.steps[8].target is not None and script.steps[8].target.describe() == 'text "Send request"'
    assert script.steps[7].down is False


def test_a_json_step_file_parses_too(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "steps": [
                {"navigate": "https://example.com/a"},
                {"wait": {"seconds": 1.5}},
                {"done": {"text": "ok", "success": False}},
            ]
        }
    )
    path = tmp_path / "steps.json"
    path.write_text(text)
    script = load_step_file(path)
    assert script.ends_with_done
    assert script.steps[1].seconds == 1.5
    assert script.steps[2].success is False


BAD_STEP_FILES = [
    ("", "the step file is empty"),
    ("- click: {}", "must be a mapping with a 'steps' list, not a list"),
    ("just text", "must be a mapping with a 'steps' list, not text"),
    ("steps: [", "not valid YAML: line 1"),
    ("name: x", "has no 'steps'"),
    ("steps: []", "'steps' is empty"),
    ("steps: {click: 1}", "'steps' must be a list, not a mapping"),
    ("steps: [navigate: /a]\nextra: 1", "unknown top-level key(s) extra"),
    ("name: [1]\nsteps: [{navigate: /a}]", "the step file: name must be text, not a list"),
    ("steps:\n  - navigate: /a\n  - fly: {to: moon}", "step 2: unknown action or key 'fly'"),
    ("steps:\n  - goal: just a goal", "step 1: no action"),
    (
        "steps:\n  - {navigate: /a, click: {target: {text: x}}}",
        "step 1: exactly one action per step, found navigate and click",
    ),
    ("steps:\n  - 42", "step 1: a step must be a mapping"),
    ("steps:\n  - navigate: ftp://x", "step 1 (navigate): 'ftp://x' is neither a path"),
    ("steps:\n  - navigate: {url: /a}", "step 1 (navigate): navigate takes a path or an http(s) URL, not a mapping"),
    ("steps:\n  - navigate: ''", "step 1 (navigate): the path or URL is empty"),
    ("steps:\n  - click: {}", "step 1 (click): missing 'target'"),
    ("steps:\n  - click: Next", "step 1 (click): click takes a mapping of parameters, not text"),
    ("steps:\n  - click: {target: Next}", "step 1 (click): target must be a mapping"),
    ("steps:\n  - click: {target: {}}", "a target needs exactly one of text, label, role, css, found none"),
    (
        "steps:\n  - click: {target: {text: a, css: b}}",
        "a target needs exactly one of text, label, role, css, found text and css",
    ),
    ("steps:\n  - click: {target: {xpath: //a}}", "step 1 (click): unknown target key(s) 'xpath'"),
    ("steps:\n  - click: {target: {text: a, name: b}}", "'name' goes only with a 'role' target"),
    ("steps:\n  - click: {target: {text: ''}}", "step 1 (click): target text is empty"),
    ("steps:\n  - click: {target: {css: [a]}}", "step 1 (click): target css must be text, not a list"),
    ("steps:\n  - click: {target: {text: a}, force: true}", "step 1 (click): unknown parameter(s) 'force'"),
    ("steps:\n  - type: {target: {label: Name}}", "step 1 (type): missing 'text'"),
    ("steps:\n  - type: {target: {label: Name}, text: {a: 1}}", "step 1 (type): text must be text, not a mapping"),
    ("steps:\n  - select: {target: {label: Product}}", "step 1 (select): missing 'option'"),
    ("steps:\n  - select: {target: {label: Product}, option: true}", "option must be text, not a boolean (true)"),
    ("steps:\n  - scroll: {direction: left}", "step 1 (scroll): direction must be 'down' or 'up'"),
    ("steps:\n  - scroll: {pages: 21}", "step 1 (scroll): pages must be more than 0 and at most 20, not 21"),
    ("steps:\n  - scroll: {pages: many}", "step 1 (scroll): pages must be a number, not text"),
    ("steps:\n  - wait: {seconds: 61}", "step 1 (wait): seconds must be more than 0 and at most 60, not 61"),
    ("steps:\n  - wait: {seconds: 0}", "seconds must be more than 0"),
    ("steps:\n  - wait: {seconds: .nan}", "step 1 (wait): seconds must be a number"),
    ("steps:\n  - wait: {}", "step 1 (wait): missing 'seconds'"),
    ("steps:\n  - wait: 3", "step 1 (wait): wait takes a mapping of parameters, not a number"),
    ("steps:\n  - done: {success: true}", "step 1 (done): missing 'text'"),
    ("steps:\n  - done: {text: ok, success: yes please}", "step 1 (done): success must be true or false"),
    ("steps:\n  - done: {text: ok}\n  - navigate: /a", "step 1: 'done' must be the last step"),
    ("steps:\n  - navigate: /a\n    goal: [x]", "step 1 (navigate): goal must be text, not a list"),
    ("steps:\n  - navigate: /a\n    navigate: /b", "line 3: duplicate key 'navigate'"),
    ("steps: [{navigate: /a}]\n" + "x: " * 2, "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_STEP_FILES)
def test_a_bad_step_file_is_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(StepFileError) as raised:
        parse_step_file(text)
    assert message in str(raised.value)


def test_step_files_have_size_limits(tmp_path: Path) -> None:
    too_many = "steps:\n" + "  - wait: {seconds: 1}\n" * 501
    with pytest.raises(StepFileError, match="too many steps: 501, at most 500"):
        parse_step_file(too_many)
    parse_step_file("steps:\n" + "  - wait: {seconds: 1}\n" * 500)
    huge = "steps:\n  - navigate: /a\n" + "#" * MAX_BYTES
    with pytest.raises(StepFileError, match="larger than 1048576 bytes"):
        parse_step_file(huge)
    path = tmp_path / "huge.yaml"
    path.write_text(huge)
    with pytest.raises(StepFileError, match="larger than 1048576 bytes"):
        load_step_file(path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"steps: \xff\xfe")
    with pytest.raises(StepFileError, match="not UTF-8"):
        load_step_file(binary)
    with pytest.raises(StepFileError, match="cannot read"):
        load_step_file(tmp_path / "missing.yaml")


# -- the LLM from the environment (no network: models are only constructed) -----------------------


def test_no_llm_configured_means_none() -> None:
    from sandboxes.agents.llm import chat_model_from_env

    assert chat_model_from_env({}) is None
    assert chat_model_from_env({"NAMEK_LLM_MODEL": "  "}) is None


def test_an_openai_compatible_endpoint_is_the_default() -> None:
    from sandboxes.agents.llm import chat_model_from_env

    model = chat_model_from_env(
        {"NAMEK_LLM_MODEL": "gpt-4.1-mini", "NAMEK_LLM_BASE_URL": "http://litellm:4000/v1", "NAMEK_LLM_API_KEY": "k"}
    )
    assert model is not None
    assert (model.provider, model.model) == ("openai", "gpt-4.1-mini")
    assert str(getattr(model, "base_url", "")) == "http://litellm:4000/v1"
    anthropic = chat_model_from_env({"NAMEK_LLM_PROVIDER": "Anthropic", "NAMEK_LLM_MODEL": "claude-x"})
    assert anthropic is not None and anthropic.provider == "anthropic"
    ollama = chat_model_from_env({"NAMEK_LLM_PROVIDER": "ollama", "NAMEK_LLM_MODEL": "qwen"})
    assert ollama is not None and ollama.provider == "ollama"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NAMEK_LLM_PROVIDER": "skynet", "NAMEK_LLM_MODEL": "x"}, "NAMEK_LLM_PROVIDER='skynet' is not supported"),
        ({"NAMEK_LLM_API_KEY": "k"}, "NAMEK_LLM_MODEL is not set"),
        ({"NAMEK_LLM_MODEL": "m", "NAMEK_LLM_BASE_URL": "litellm:4000"}, "NAMEK_LLM_BASE_URL='litellm:4000' must be"),
        ({"NAMEK_LLM_PROVIDER": "ollama", "NAMEK_LLM_MODEL": "m", "NAMEK_LLM_API_KEY": "k"}, "NAMEK_LLM_API_KEY"),
    ],
)
def test_a_bad_llm_configuration_names_the_variable(environ: dict[str, str], message: str) -> None:
    from sandboxes.agents.llm import chat_model_from_env

    with pytest.raises(ValueError) as raised:
        chat_model_from_env(environ)
    assert message in str(raised.value)


# -- a real browser ------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """tests/fixtures/agent_site over HTTP on loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """Debian's Chromium, headless, with its own profile, HOME and TMPDIR; its CDP HTTP URL."""
    profile = tmp_path / "chromium-profile"
    # Short: Chromium puts its singleton socket in TMPDIR, and socket paths end at 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="namek-chromium-"))
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home)}
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--test-type",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--window-size=1280,800",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its ~9 processes share one group: killed together below
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


async def page_state(cdp_url: str) -> dict[str, Any]:
    """The form as the page holds it, read over our own CDP connection to the page."""
    from websockets.asyncio.client import connect

    with urllib.request.urlopen(f"{cdp_url}/json/list", timeout=10) as response:
        pages = [target for target in json.load(response) if target["type"] == "page"]
    assert pages, "no page in the browser"
    expression = """JSON.stringify({
        url: location.href,
        name: document.getElementById('full-name')?.value,
        email: document.getElementById('email')?.value,
        product: document.getElementById('product')?.value,
        productText: document.getElementById('product')?.selectedOptions[0]?.text,
        quantity: document.getElementById('quantity')?.value,
        express: document.getElementById('express')?.checked,
        status: document.getElementById('status')?.textContent,
    })"""
    async with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as page:
        await page.send(
            json.dumps(
                {"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression, "returnByValue": True}}
            )
        )
        while True:
            answer = json.loads(await page.recv())
            if answer.get("id") == 1:
                return json.loads(answer["result"]["result"]["value"])


async def play(cdp_url: str, base_url: str, script_text: str, work_dir: Path, **hooks: Any) -> tuple[Any, Any, Any]:
    """Build the agent as the runner does and run it to the end: (agent, model, history)."""
    from sandboxes.agents.runner import build_agent, disconnect_browser

    script = parse_step_file(script_text)
    agent, model, max_steps = build_agent(
        task=script.describe_task(),
        cdp_url=cdp_url,
        headers=None,
        script=script,
        base_url=base_url,
        work_dir=work_dir,
        max_steps=None,
    )
    try:
        history = await agent.run(max_steps=max_steps, **hooks)
    finally:
        await disconnect_browser(agent.browser_session)
    return agent, model, history


def _actions(history: Any) -> list[dict[str, Any]]:
    return [
        action.model_dump(exclude_unset=True)
        for item in history.history
        if item.model_output is not None
        for action in item.model_output.action
    ]


@pytest.mark.processes
@pytest.mark.browser
async def test_the_scripted_model_fills_the_form_through_browser_use(chromium: str, site: str, tmp_path: Path) -> None:
    from sandboxes.agents.runner import capture_screenshot

    shots: list[tuple[bytes, str] | None] = []

    async def screenshots_in_three_sizes(agent: Any) -> None:
        if not shots:  # after the first step: as taken, then forced smaller, then impossible
            shots.append(await capture_screenshot(agent.browser_session))
            assert shots[0] is not None
            shots.append(await capture_screenshot(agent.browser_session, limit=len(shots[0][0]) // 2))
            shots.append(await capture_screenshot(agent.browser_session, limit=100))

    started = time.monotonic()
    _, model, history = await play(chromium, site, QUOTE_SCRIPT, tmp_path, on_step_end=screenshots_in_three_sizes)
    assert model.failure is None, model.failure
    assert shots[0] is not None and shots[0][1] == "png" and shots[0][0].startswith(b"\x89PNG")
    assert shots[1] is not None and shots[1][1] == "jpeg" and shots[1][0].startswith(b"\xff\xd8")
    assert len(shots[1][0]) <= len(shots[0][0]) // 2
    assert shots[2] is None
    assert history.is_done() and history.is_successful(), history.final_result()
    assert history.final_result() == "Played all 9 steps of Request a quote"

    state = await page_state(chromium)
    assert state["url"] == f"{site}form.html"
    assert state["name"] == "Ada Lovelace"
    assert state["email"] == "ada@example.com"
    assert (state["product"], state["productText"]) == ("desk", "Desk lamp")
    assert state["quantity"] == "20"
    assert state["express"] is True
    assert state["status"] == "Quote requested: 20 x desk for Ada Lovelace (express)"

    names = [next(iter(action)) for action in _actions(history)]
    assert names == [
        "navigate",
        "input",
        "input",
        "select_dropdown",
        "input",
        "click",
        "scroll",
        "scroll",
        "click",
        "done",
    ]
    # Every answer went through browser-use's element indices and the messages it built.
    assert len(model.received) == 10
    assert all("<browser_state>" in messages[-1].text for messages in model.received[1:])
    assert time.monotonic() - started < 60


@pytest.mark.processes
@pytest.mark.browser
async def test_a_missing_target_fails_the_run_naming_the_step(chromium: str, site: str, tmp_path: Path) -> None:
    script = """
steps:
  - navigate: /form.html
  - type: {target: {label: "Full name"}, text: "Ada"}
  - click: {target: {role: button, name: "Launch rocket"}}
  - click: {target: {text: "Send request"}}
"""
    _, model, history = await play(chromium, site, script, tmp_path)
    expected = 'step 3 (click role button named "Launch rocket"): role button named "Launch rocket" not found'
    assert model.failure is not None and model.failure.startswith(expected), model.failure
    assert history.is_done() and history.is_successful() is False
    assert history.final_result() == model.failure
    # It looked twice more before giving up, and never went on to step 4.
    assert [next(iter(action)) for action in _actions(history)] == ["navigate", "input", "wait", "wait", "done"]
    assert (await page_state(chromium))["status"] == ""


@pytest.mark.processes
@pytest.mark.browser
async def test_an_ambiguous_target_fails_naming_the_candidates(chromium: str, site: str, tmp_path: Path) -> None:
    script = """
steps:
  - navigate: /form.html
  - click: {target: {text: "Details"}}
"""
    _, model, history = await play(chromium, site, script, tmp_path)
    assert model.failure is not None
    assert model.failure.startswith('step 2 (click text "Details"): text "Details" is ambiguous: 2 elements match: ')
    assert model.failure.count('<button type="button" class="details"> "Details"') == 2
    assert history.is_successful() is False
    assert (await page_state(chromium))["status"] == "", "nothing was clicked"

    css = """
steps:
  - navigate: /form.html
  - click: {target: {css: "button.details"}}
"""
    _, model, _ = await play(chromium, site, css, tmp_path)
    assert model.failure is not None
    assert model.failure.startswith(
        'step 2 (click css "button.details"): css "button.details" is ambiguous: 2 elements'
    )


@pytest.mark.processes
@pytest.mark.browser
async def test_a_step_that_keeps_failing_ends_the_run(chromium: str, site: str, tmp_path: Path) -> None:
    script = """
steps:
  - navigate: /form.html
  - select: {target: {label: "Product"}, option: "Chandelier"}
  - type: {target: {label: "Full name"}, text: "Ada"}
"""
    _, model, history = await play(chromium, site, script, tmp_path)
    assert model.failure is not None
    assert model.failure.startswith('step 2 (select label "Product"): failed 3 times: ')
    assert "'Chandelier' is not one of the available options" in model.failure
    assert [next(iter(action)) for action in _actions(history)] == ["navigate"] + ["select_dropdown"] * 3 + ["done"]
    assert (await page_state(chromium))["name"] == ""


@pytest.mark.processes
@pytest.mark.browser
async def test_a_script_longer_than_the_step_budget_fails_naming_the_step(
    chromium: str, site: str, tmp_path: Path
) -> None:
    from sandboxes.agents.runner import build_agent, disconnect_browser

    script = parse_step_file("steps:\n  - navigate: /form.html\n  - type: {target: {label: Email}, text: a@b}\n")
    agent, model, max_steps = build_agent(
        task="t", cdp_url=chromium, headers=None, script=script, base_url=site, work_dir=tmp_path, max_steps=2
    )
    assert max_steps == 2
    try:
        history = await agent.run(max_steps=max_steps)
    finally:
        await disconnect_browser(agent.browser_session)
    assert model.failure == (
        "step 2 (type label \"Email\"): the agent allows only 'done' now (its step or failure budget is used up)"
    )
    assert history.is_successful() is False


@pytest.mark.processes
@pytest.mark.browser
async def test_a_paused_agent_rests_and_reads_the_note_it_is_resumed_with(
    chromium: str, site: str, tmp_path: Path
) -> None:
    """Pause lands while the model answers step 3: browser-use drops that answer, rests, and asks again."""
    from sandboxes.agents.runner import build_agent, disconnect_browser, pause_agent, resume_agent

    script = parse_step_file(
        """
steps:
  - navigate: /form.html
  - type: {target: {label: "Full name"}, text: "Ada Lovelace"}
  - type: {target: {label: "Email"}, text: "ada@example.com"}
  - select: {target: {label: "Product"}, option: "Floor lamp"}
"""
    )
    agent, model, max_steps = build_agent(
        task="Fill in the quote form",
        cdp_url=chromium,
        headers=None,
        script=script,
        base_url=site,
        work_dir=tmp_path,
        max_steps=None,
    )
    at_rest = asyncio.Event()
    paused_once = False

    async def pause_while_the_model_answers_step_3(state: Any, output: Any, step: int) -> None:
        # browser-use calls this after the model answered and before it acts: the answer is dropped.
        nonlocal paused_once
        if not paused_once and "[namek script step 3," in (output.memory or ""):
            paused_once = True
            pause_agent(agent)

    async def on_step_end(agent: Any) -> None:
        if agent.state.paused:
            at_rest.set()

    agent.register_new_step_callback = pause_while_the_model_answers_step_3
    run = asyncio.create_task(agent.run(max_steps=max_steps, on_step_end=on_step_end))
    try:
        await asyncio.wait_for(at_rest.wait(), timeout=30)
        asked = len(model.received)
        before = await page_state(chromium)
        assert before["name"] == "Ada Lovelace"
        assert before["email"] == "", "the dropped answer was not acted on"
        await asyncio.sleep(2)
        assert await page_state(chromium) == before, "the page changed while the agent was paused"
        assert len(model.received) == asked, "the paused agent asked its model again"
        assert not run.done()

        await resume_agent(agent, "NOTE-123: the customer prefers floor lamps")
        history = await asyncio.wait_for(run, timeout=30)
    finally:
        if not run.done():
            agent.stop()  # also wakes a paused run loop
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), timeout=30)
        await disconnect_browser(agent.browser_session)

    assert model.failure is None, model.failure
    assert history.is_successful(), history.final_result()
    after_resume = [message.text for messages in model.received[asked:] for message in messages]
    assert any("NOTE-123" in text for text in after_resume), "the note never reached the model"
    assert not any("NOTE-123" in message.text for messages in model.received[:asked] for message in messages)
    # Step 3 was answered again after the pause, not skipped; each step acted once.
    inputs = [action["input"]["text"] for action in _actions(history) if "input" in action]
    assert inputs == ["Ada Lovelace", "ada@example.com"]
    state = await page_state(chromium)
    assert (state["name"], state["email"], state["productText"]) == ("Ada Lovelace", "ada@example.com", "Floor lamp")
    thinking = [item.model_output.thinking or "" for item in history.history if item.model_output is not None]
    assert any("Read the note: NOTE-123" in text for text in thinking)


# -- the runner over a test double of the agent bridge ---------------------------------------------


class FakeBridge:
    """Namek's side of the agent bridge, as the runner's docstring describes it."""

    def __init__(self, chromium: str | None = None) -> None:
        self.inbox: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.connection: Any = None
        self.authorization: str | None = None
        self.cdp_authorizations: list[str | None] = []
        self.chromium = chromium  # relayed at /ws/sandboxes/3/cdp/, as Namek does
        self.port = 0

    @property
    def cdp_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/sandboxes/3/cdp/"

    async def handler(self, connection: Any) -> None:
        if connection.request.path == "/ws/sandboxes/3/cdp/":
            await self.relay_cdp(connection)
            return
        self.connection = connection
        self.authorization = connection.request.headers.get("Authorization")
        self.connected.set()
        with contextlib.suppress(Exception):
            async for raw in connection:
                await self.inbox.put((time.monotonic(), json.loads(raw)))

    async def relay_cdp(self, connection: Any) -> None:
        """Pump CDP frames between the runner and the test browser, noting the runner's credentials."""
        from websockets.asyncio.client import connect

        self.cdp_authorizations.append(connection.request.headers.get("Authorization"))
        assert self.chromium is not None
        with urllib.request.urlopen(f"{self.chromium}/json/version", timeout=10) as response:
            browser_url = json.load(response)["webSocketDebuggerUrl"]
        async with connect(browser_url, max_size=None) as upstream:

            async def pump(source: Any, sink: Any) -> None:
                async for frame in source:
                    await sink.send(frame)

            pumps = [asyncio.create_task(pump(connection, upstream)), asyncio.create_task(pump(upstream, connection))]
            with contextlib.suppress(Exception):
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def next(self, timeout: float = 30) -> tuple[float, dict[str, Any]]:
        return await asyncio.wait_for(self.inbox.get(), timeout=timeout)

    async def next_message(self, timeout: float = 30) -> dict[str, Any]:
        return (await self.next(timeout))[1]

    async def until(self, predicate: Any, timeout: float = 30) -> tuple[list[dict[str, Any]], float]:
        """Messages up to and including the first that satisfies ``predicate``, and its arrival time."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            at, message = await self.next(max(0.1, deadline - time.monotonic()))
            seen.append(message)
            if predicate(message):
                return seen, at


@contextlib.asynccontextmanager
async def runner_process(
    bridge: FakeBridge, tmp_path: Path, *args: str, token_in_env: bool = False
) -> AsyncIterator[asyncio.subprocess.Process]:
    from websockets.asyncio.server import serve

    async with serve(bridge.handler, "127.0.0.1", 0, max_size=None) as server:
        bridge.port = next(iter(server.sockets)).getsockname()[1]
        log = (tmp_path / "runner.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandboxes.agents.runner",
            "--bridge",
            f"ws://127.0.0.1:{bridge.port}/ws/agent/7/",
            *([] if token_in_env else ["--token", "run-token-42"]),
            "--work-dir",
            str(tmp_path / "work"),
            *args,
            cwd=ROOT,
            env={**os.environ, "NAMEK_RUN_TOKEN": "run-token-42"} if token_in_env else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        except BaseException:
            log.flush()
            sys.stderr.write((tmp_path / "runner.log").read_text(errors="replace")[-5000:])
            raise
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            log.close()


async def handshake(
    bridge: FakeBridge, script: str | None, base_url: str | None, cdp_url: str = "ws://namek.invalid/cdp/"
) -> None:
    await asyncio.wait_for(bridge.connected.wait(), timeout=30)
    hello = await bridge.next_message()
    assert hello == {"type": "hello", "agent": f"browser-use {importlib.metadata.version('browser-use')}"}
    assert bridge.authorization == "Bearer run-token-42"
    await bridge.send(
        {
            "type": "welcome",
            "run": 7,
            "sandbox": 3,
            "task": "Request a quote",
            "cdp_url": cdp_url,
            "script": script,
            "base_url": base_url,
        }
    )


def assert_screenshot(message: dict[str, Any]) -> None:
    from sandboxes.agents.runner import MAX_SCREENSHOT_BYTES

    data = base64.b64decode(message["screenshot"], validate=True)
    assert len(data) <= MAX_SCREENSHOT_BYTES
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}[message["screenshot_type"]]
    assert data.startswith(magic)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        picture.verify()


RUNNER_SCRIPT = """
name: Quote over the bridge
steps:
  - navigate: /form.html
    goal: Open the quote form
  - type: {target: {label: "Full name"}, text: "Ada Lovelace"}
  - wait: {seconds: 4}
    goal: Let the page settle
  - type: {target: {label: "Email"}, text: "ada@example.com"}
  - select: {target: {label: "Product"}, option: "Table lamp"}
  - done: {text: "Quote form filled"}
"""


@pytest.mark.processes
@pytest.mark.browser
async def test_the_runner_plays_a_script_over_the_bridge_and_pauses_between_steps(
    chromium: str, site: str, tmp_path: Path
) -> None:
    bridge = FakeBridge()
    async with runner_process(bridge, tmp_path, "--cdp-url", chromium) as process:
        await handshake(bridge, RUNNER_SCRIPT, site)
        assert await bridge.next_message() == {"type": "status", "status": "running"}
        log = await bridge.next_message()
        assert log["kind"] == "agent.log" and "Quote over the bridge" in log["text"]

        # Steps 1 and 2, then pause while step 3 (a 3 s wait) is in flight.
        first, _ = await bridge.until(lambda m: m.get("kind") == "agent.step" and m["data"]["step"] == 2)
        steps = [m for m in first if m.get("kind") == "agent.step"]
        assert [m["data"]["step"] for m in steps] == [1, 2]
        assert steps[0]["text"] == "Open the quote form"
        assert steps[0]["data"]["actions"] == [
            {"name": "navigate", "params": {"url": f"{site}form.html", "new_tab": False}}
        ]
        assert steps[0]["data"]["url"] == f"{site}form.html"
        assert steps[0]["data"]["title"] == "Request a quote"
        assert steps[1]["data"]["actions"][0]["name"] == "input"
        for step in steps:
            assert_screenshot(step)
        await asyncio.sleep(1.2)  # step 3 is now (almost surely) in its 4 s wait
        pause_sent = time.monotonic()
        await bridge.send({"type": "pause", "id": 1})
        settled, acked_at = await bridge.until(lambda m: m.get("type") == "ack")
        assert settled[-1] == {"type": "ack", "id": 1, "command": "pause"}
        finished = [m["data"]["step"] for m in settled if m.get("kind") == "agent.step"]
        if finished:
            # The usual case: the pause came during the wait, which ran to its end first.
            assert finished == [3]
            assert acked_at - pause_sent > 2, "acknowledged before the step in flight had finished"
        # Otherwise (a very slow machine) it came at a checkpoint before the wait began:
        # browser-use dropped that step, and plays it again after the resume.
        assert await bridge.next_message() == {"type": "status", "status": "paused"}

        # At rest: nothing happens on the page or the bridge.
        before = await page_state(chromium)
        with pytest.raises(TimeoutError):
            await bridge.next(timeout=2)
        assert await page_state(chromium) == before
        assert before["email"] == ""

        await bridge.send({"type": "resume", "id": 2, "note": "NOTE-123 use the table lamp"})
        assert await bridge.next_message() == {"type": "ack", "id": 2, "command": "resume"}
        assert await bridge.next_message() == {"type": "status", "status": "running"}
        rest, _ = await bridge.until(lambda m: m.get("type") == "status")
        assert rest[-1] == {"type": "status", "status": "done", "result": "Quote form filled"}
        later = [m for m in rest if m.get("kind") == "agent.step"]
        assert [m["data"]["step"] for m in later] == list(range(3 + len(finished), 7))
        assert "Read the note: NOTE-123 use the table lamp" in (later[0]["data"]["thinking"] or "")
        assert later[-1]["data"]["actions"] == [
            {"name": "done", "params": {"text": "Quote form filled", "success": True}}
        ]
        # Every step of the file ran once, in order, whatever the pause interrupted.
        played = [
            a["name"] for m in [*steps, *settled, *later] if m.get("kind") == "agent.step" for a in m["data"]["actions"]
        ]
        assert played == ["navigate", "input", "wait", "input", "select_dropdown", "done"]
        for step in later:
            assert_screenshot(step)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0

    state = await page_state(chromium)
    assert (state["name"], state["email"], state["productText"]) == ("Ada Lovelace", "ada@example.com", "Table lamp")
    # The runner kept what the model was given: the note only after the resume, from then on.
    calls = [json.loads(line) for line in (tmp_path / "work" / "model-inputs.jsonl").read_text().splitlines()]
    assert len(calls) >= 6 and all(call["structured"] for call in calls)
    noted = [any("NOTE-123" in message["text"] for message in call["messages"]) for call in calls]
    assert noted[:2] == [False] * 2 and noted[-3:] == [True] * 3
    assert noted == sorted(noted), "the note came and stayed"


@pytest.mark.processes
@pytest.mark.browser
async def test_the_runner_stops_when_namek_says_stop(chromium: str, site: str, tmp_path: Path) -> None:
    """This one reaches the browser through the welcome's CDP URL, as in production."""
    script = "steps:\n  - navigate: /form.html\n" + "  - wait: {seconds: 1}\n" * 10
    bridge = FakeBridge(chromium)
    async with runner_process(bridge, tmp_path) as process:
        await handshake(bridge, script, site, cdp_url=bridge.cdp_url)
        await bridge.until(lambda m: m.get("kind") == "agent.step")
        await bridge.send({"type": "stop", "id": 9})
        rest, _ = await bridge.until(lambda m: m.get("type") == "status" and m["status"] != "running")
        acks = [m for m in rest if m.get("type") == "ack"]
        assert acks == [{"type": "ack", "id": 9, "command": "stop"}]
        assert rest[-1] == {"type": "status", "status": "failed", "error": "stopped by Namek"}
        assert len([m for m in rest if m.get("kind") == "agent.step"]) <= 2, "it went on after the stop"
        assert await asyncio.wait_for(process.wait(), timeout=30) == 1
    assert bridge.cdp_authorizations and set(bridge.cdp_authorizations) == {"Bearer run-token-42"}


@pytest.mark.processes
@pytest.mark.browser
async def test_the_runner_reports_a_termination_signal(chromium: str, site: str, tmp_path: Path) -> None:
    script = "steps:\n  - navigate: /form.html\n" + "  - wait: {seconds: 1}\n" * 10
    bridge = FakeBridge()
    async with runner_process(bridge, tmp_path, "--cdp-url", chromium) as process:
        await handshake(bridge, script, site)
        await bridge.until(lambda m: m.get("kind") == "agent.step")
        process.send_signal(signal.SIGTERM)
        rest, _ = await bridge.until(lambda m: m.get("type") == "status" and m["status"] != "running")
        assert rest[-1] == {"type": "status", "status": "failed", "error": "terminated by SIGTERM"}
        assert await asyncio.wait_for(process.wait(), timeout=30) == 1


@pytest.mark.processes
async def test_the_runner_reports_a_browser_it_cannot_reach(site: str, tmp_path: Path) -> None:
    bridge = FakeBridge()
    async with runner_process(bridge, tmp_path, "--cdp-url", "http://127.0.0.1:9") as process:
        await handshake(bridge, "steps:\n  - navigate: /form.html\n", site)
        rest, _ = await bridge.until(lambda m: m.get("type") == "status" and m["status"] != "running", timeout=60)
        assert rest[-1]["status"] == "failed"
        assert rest[-1]["error"].startswith("browser-use could not work with the browser at http://127.0.0.1:9: ")
        assert not [m for m in rest if m.get("kind") == "agent.step"]
        assert await asyncio.wait_for(process.wait(), timeout=30) == 1


@pytest.mark.processes
@pytest.mark.browser
async def test_the_runner_stops_its_agent_when_the_bridge_drops(chromium: str, site: str, tmp_path: Path) -> None:
    script = "steps:\n  - navigate: /form.html\n" + "  - wait: {seconds: 1}\n" * 20
    bridge = FakeBridge()
    async with runner_process(bridge, tmp_path, "--cdp-url", chromium) as process:
        await handshake(bridge, script, site)
        await bridge.until(lambda m: m.get("kind") == "agent.step")
        await bridge.connection.close()
        assert await asyncio.wait_for(process.wait(), timeout=30) == 3


async def test_the_runner_reports_a_bad_step_file_and_exits_2(tmp_path: Path) -> None:
    bridge = FakeBridge()
    async with runner_process(bridge, tmp_path, "--cdp-url", "http://127.0.0.1:9", token_in_env=True) as process:
        await handshake(bridge, "steps:\n  - click: {target: {text: a, css: b}}\n", None)
        final = await bridge.next_message()
        assert final["type"] == "status" and final["status"] == "failed"
        assert "step 1 (click): a target needs exactly one of" in final["error"]
        assert await asyncio.wait_for(process.wait(), timeout=30) == 2


def test_step_data_is_cut_to_fit_the_event_log() -> None:
    from sandboxes.agents.runner import MAX_STEP_DATA_BYTES, fit_data

    small = {"step": 1, "goal": "Open the form", "actions": [{"name": "click", "params": {"index": 3}}]}
    assert fit_data(small) == small
    huge = {
        "step": 2,
        "url": "http://x/",
        "title": "T",
        "thinking": "é" * 50_000,
        "actions": [{"name": "input", "params": {"index": 1, "text": "x" * 20_000}}] * 80,
    }
    fitted = fit_data(huge)
    assert len(json.dumps(fitted).encode()) <= MAX_STEP_DATA_BYTES
    assert fitted["step"] == 2 and fitted["url"] == "http://x/"


def test_the_runner_refuses_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sandboxes.agents.runner", "--bridge", "http://x/", "--token", "t"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--bridge must be a ws:// or wss:// URL" in result.stderr
    environ = {key: value for key, value in os.environ.items() if key != "NAMEK_RUN_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "sandboxes.agents.runner", "--bridge", "ws://x/"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "the run token is missing: give --token or set NAMEK_RUN_TOKEN" in result.stderr

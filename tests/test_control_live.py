"""Take-over against a real Namek: the lease enforced on raw RFB, the terminal and the
CDP relay; 20 operators racing; a scripted agent paused, driven past and resumed with a
note; two Daphne processes sharing a real Redis (Debian's redis-server, started and
stopped here) and the lapse.

The page is read over the sandbox's own DevTools socket (not through Namek), so that
what a test reads cannot depend on whose commands Namek holds.

Bad input tried: raw RFB KeyEvents, PointerEvents and ClientCutText from a view-only
client and from the future holder before it holds control; terminal keystrokes from a
viewer; CDP commands from an outside client while a person drives; 19 losing take-over
requests sent at the same moment as the winner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect

from sandboxes import rfb
from tests.live import LiveNamek, ready_sandbox, redis_server
from tests.test_agent_runs import agent_events, start, wait_event, wait_run
from tests.test_screen_relay import Cdp, RelayClient, cdp_page_id, key_event, pointer_event, relay_url
from tests.test_terminal import Viewer

pytestmark = pytest.mark.processes

CONTROL_L, KEY_V = 0xFFE3, 0x76

PROBE = """
document.getElementById('probe')?.remove();
document.body.insertAdjacentHTML('afterbegin',
  '<input id="probe" style="position:fixed;left:100px;top:100px;width:400px;height:40px;font-size:20px">');
window.__downs = 0;
document.addEventListener('mousedown', () => { window.__downs += 1; }, true);
document.getElementById('probe').focus();
'ready'
"""


@pytest.fixture
def box(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    with ready_sandbox(live_namek, name="control") as created:
        yield created


@contextlib.asynccontextmanager
async def page_devtools(namek: LiveNamek, sandbox_id: int, url_part: str = "/sandboxes/start/") -> AsyncIterator[Cdp]:
    """The sandbox's page, straight over its DevTools socket."""
    socket_path = namek.browser_socket(sandbox_id)
    page_id = await asyncio.to_thread(cdp_page_id, socket_path, url_part)
    async with unix_connect(socket_path, f"ws://127.0.0.1/devtools/page/{page_id}", max_size=None) as ws:
        cdp = Cdp(ws)
        # "Ready" means the screen and DevTools answer; the page may still be loading.
        deadline = time.monotonic() + 15
        while not await cdp.evaluate("document.readyState === 'complete' && !!document.body"):
            assert time.monotonic() < deadline, "the page did not finish loading"
            await asyncio.sleep(0.1)
        yield cdp


@contextlib.asynccontextmanager
async def screen(
    namek: LiveNamek, sandbox_id: int, who: str, ws_base: str | None = None
) -> AsyncIterator[ClientConnection]:
    """A raw RFB client of the relay, past the handshake."""
    url = relay_url(namek, sandbox_id).replace(namek.ws_base, ws_base or namek.ws_base)
    async with connect(
        url,
        subprotocols=["binary"],
        max_size=None,
        additional_headers={"Authorization": f"Bearer {namek.token(who)}"},
        open_timeout=10,
    ) as ws:
        await RelayClient(ws).handshake()
        yield ws


def cut_text(text: str) -> bytes:
    data = text.encode("latin-1")
    return struct.pack(">BxxxI", rfb.MSG_CLIENT_CUT_TEXT, len(data)) + data


async def send_input(ws: ClientConnection, x: int, y: int) -> None:
    """A click on the probe, "ab" typed, then "clip" pasted (ClientCutText + Ctrl+V)."""
    for message in (
        pointer_event(0, x, y),
        pointer_event(1, x, y),
        pointer_event(0, x, y),
        key_event(True, ord("a")),
        key_event(False, ord("a")),
        key_event(True, ord("b")),
        key_event(False, ord("b")),
        cut_text("clip"),
    ):
        await ws.send(message)
    await asyncio.sleep(0.3)  # the clipboard is set before the paste
    for message in (key_event(True, CONTROL_L), key_event(True, KEY_V), key_event(False, KEY_V)):
        await ws.send(message)
    await ws.send(key_event(False, CONTROL_L))


async def probe_state(cdp: Cdp) -> list[Any]:
    return await cdp.evaluate("[document.getElementById('probe').value, window.__downs]")


async def wait_value(cdp: Cdp, value: str, timeout: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout
    state = await probe_state(cdp)
    while state[0] != value and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        state = await probe_state(cdp)
    return state


async def api(namek: LiveNamek, method: str, path: str, who: str = "owner", body: Any = None) -> tuple[int, Any]:
    return await asyncio.to_thread(namek.api, method, path, who, body)


def control_events(namek: LiveNamek, sandbox_id: int, who: str = "owner") -> list[dict[str, Any]]:
    page = namek.api("GET", f"/api/sandboxes/{sandbox_id}/events?limit=1000", who)[1]
    return [e for e in page["events"] if e["kind"].startswith("control.")]


async def test_only_the_holders_rfb_input_changes_the_page(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    sandbox_id = box["id"]
    async with page_devtools(live_namek, sandbox_id) as cdp:
        assert await cdp.evaluate(PROBE) == "ready"
        chrome_height = await cdp.evaluate("outerHeight - innerHeight")
        x, y = 300, chrome_height + 120  # the middle of the probe, on the screen
        async with (
            screen(live_namek, sandbox_id, "viewer") as viewer,
            screen(live_namek, sandbox_id, "operator") as holder,
        ):
            # Nobody drives yet: the future holder's bytes are dropped as well.
            await send_input(viewer, x, y)
            await send_input(holder, x, y)
            await asyncio.sleep(1.5)
            assert await probe_state(cdp) == ["", 0]

            status, state = await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/takeover", "operator")
            assert (status, state["state"]) == (200, "you"), state
            await send_input(viewer, x, y)
            await asyncio.sleep(1.5)
            assert await probe_state(cdp) == ["", 0], "a viewer's input reached the page"

            # The same bytes from the holder, on the socket it opened before taking over.
            await send_input(holder, x, y)
            assert await wait_value(cdp, "abclip") == ["abclip", 1]
            await asyncio.sleep(1.0)  # the counts reach the span within half a second
            status, _ = await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/handback", "operator")
            assert status == 200
            # Handed back: the holder's input is dropped again, still without reconnecting.
            await send_input(holder, x, y)
            await asyncio.sleep(1.5)
            assert await probe_state(cdp) == ["abclip", 1]
            # The viewer was served frames all along.
            viewer_client = RelayClient(viewer)
            assert await viewer_client.full_update()

    logged = await asyncio.to_thread(control_events, live_namek, sandbox_id)
    assert [e["kind"] for e in logged] == ["control.requested", "control.granted", "control.handed_back"]
    granted, handed = logged[1], logged[2]
    assert granted["actor"] == handed["actor"] == "operator"
    assert handed["data"]["inputs"] == {"keys": 8, "pointer": 3, "clipboard": 1, "terminal": 0}
    assert "(12 input events)" in handed["text"]
    for event in (granted, handed):  # a screenshot of the screen at take-over and at hand-back
        request = urllib.request.Request(live_namek.base_url + event["screenshot_url"])
        request.add_header("Authorization", f"Bearer {live_namek.token()}")
        with urllib.request.urlopen(request, timeout=10) as response:
            image = response.read()
        assert image[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", image[16:24]) == (1280, 800)


async def test_only_the_holder_types_in_the_terminal(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    sandbox_id = box["id"]
    terminal_url = f"{live_namek.ws_base}/ws/sandboxes/{sandbox_id}/terminal/"

    async def open_terminal(who: str) -> Viewer:
        headers = {"Authorization": f"Bearer {live_namek.token(who)}"}
        ws = await connect(terminal_url, additional_headers=headers, open_timeout=10, max_size=None)
        kind, setup = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert kind == "setup"
        return Viewer(ws, setup)

    viewer, holder = await open_terminal("viewer"), await open_terminal("owner")
    try:
        assert viewer.setup["readonly"] is True and holder.setup["readonly"] is True
        await viewer.type("echo VIEWER-$((40+1))")
        await holder.type("echo EARLY-$((40+2))")
        status, _ = await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/takeover")
        assert status == 200
        # The same socket gets a new setup: its tmux client is re-attached writable.
        kind, setup = json.loads(await asyncio.wait_for(holder.ws.recv(), 10))
        while kind != "setup":
            kind, setup = json.loads(await asyncio.wait_for(holder.ws.recv(), 10))
        assert setup["readonly"] is False
        await viewer.type("echo VIEWER-$((40+3))")
        await holder.type("echo HOLDER-$((40+4))")
        await holder.wait_for("HOLDER-44")
        await viewer.wait_for("HOLDER-44")  # the viewer watches the same shell
        assert "VIEWER-41" not in viewer.output + holder.output and "VIEWER-43" not in viewer.output + holder.output
        assert "EARLY-42" not in holder.output
    finally:
        await viewer.ws.close()
        await holder.ws.close()
    assert (await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/handback"))[0] == 200
    handed = (await asyncio.to_thread(control_events, live_namek, sandbox_id))[-1]
    assert handed["kind"] == "control.handed_back" and handed["data"]["inputs"]["terminal"] == 1


async def test_an_outside_cdp_client_is_held_while_a_person_drives(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    sandbox_id = box["id"]
    headers = {"Authorization": f"Bearer {live_namek.token('operator')}"}
    async with connect(
        f"{live_namek.ws_base}/ws/sandboxes/{sandbox_id}/cdp/", additional_headers=headers, max_size=None
    ) as outside:

        async def answer(command_id: int, timeout: float) -> dict[str, Any] | None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while True:
                        message = json.loads(await outside.recv())
                        if message.get("id") == command_id:
                            return message
            return None

        await outside.send(json.dumps({"id": 1, "method": "Target.getBrowserContexts"}))
        assert await answer(1, 5) is not None
        assert (await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/takeover"))[0] == 200
        await outside.send(json.dumps({"id": 2, "method": "Target.getBrowserContexts"}))
        await outside.send(json.dumps({"id": 3, "method": "Browser.getVersion"}))  # cannot change a page: passes
        assert await answer(3, 5) is not None
        assert await answer(2, 1.5) is None, "a command went through while a person drove"
        assert (await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/handback"))[0] == 200
        assert await answer(2, 5) is not None, "the held command was not released on hand-back"


def race_takeovers(namek: LiveNamek, sandbox_id: int, base_urls: list[str], racers: int = 20) -> None:
    """``racers`` operators (new users) ask to take over at the same moment, spread over
    ``base_urls`` (web processes): exactly one holds control, every other is refused with
    the holder's name, and the log has every request."""
    code = (
        "from django.contrib.auth.models import Group, User\n"
        "from sandboxes.models import ApiToken\n"
        "import json\n"
        "group = Group.objects.get(name='operator')\n"
        "tokens = {}\n"
        f"for i in range({racers}):\n"
        f"    user, _ = User.objects.get_or_create(username=f'racer{sandbox_id}-{{i:02d}}')\n"
        "    user.groups.add(group)\n"
        "    tokens[user.username] = ApiToken.issue(user, 'race')[1]\n"
        "print('TOKENS ' + json.dumps(tokens))\n"
    )
    out = namek.manage("shell", "-c", code).stdout
    tokens = json.loads(out.split("TOKENS ", 1)[1])
    barrier = threading.Barrier(len(tokens))
    answers: dict[str, tuple[int, dict[str, Any]]] = {}

    def take_over(name: str, token: str, base_url: str) -> None:
        request = urllib.request.Request(f"{base_url}/api/sandboxes/{sandbox_id}/takeover", data=b"", method="POST")
        request.add_header("Authorization", f"Bearer {token}")
        barrier.wait()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answers[name] = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as error:
            answers[name] = (error.code, json.loads(error.read()))

    threads = [
        threading.Thread(target=take_over, args=(name, token, base_urls[i % len(base_urls)]))
        for i, (name, token) in enumerate(tokens.items())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    winners = [name for name, (status, _) in answers.items() if status == 200]
    assert len(answers) == racers and len(winners) == 1, answers
    winner = winners[0]
    assert answers[winner][1]["label"] == "You are driving"
    for name, (status, body) in answers.items():
        if name != winner:
            assert status == 409, (name, status, body)
            assert body["error"] in (f"{winner} is driving", f"{winner} is taking over"), body
    state = namek.api("GET", f"/api/sandboxes/{sandbox_id}/control")[1]
    assert (state["state"], state["user"]) == ("person", winner)
    logged = control_events(namek, sandbox_id)
    assert sum(e["kind"] == "control.requested" for e in logged) == racers
    assert sum(e["kind"] == "control.refused" for e in logged) == racers - 1
    assert [e["actor"] for e in logged if e["kind"] == "control.granted"] == [winner]


def test_twenty_operators_racing_get_one_holder_and_nineteen_clear_refusals(
    live_namek: LiveNamek, box: dict[str, Any]
) -> None:
    race_takeovers(live_namek, box["id"], [live_namek.base_url])


@pytest.mark.browser
async def test_take_over_a_scripted_agent_mid_run_and_hand_back_with_a_note(
    live_namek: LiveNamek, box: dict[str, Any]
) -> None:
    sandbox_id = box["id"]
    script = (Path(__file__).resolve().parent.parent / "demo" / "quote.yaml").read_text()
    run = await asyncio.to_thread(start, live_namek, sandbox_id, script=script, task="Request a quote")
    await asyncio.to_thread(wait_event, live_namek, sandbox_id, run["id"], "agent.step")

    status, state = await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/takeover")
    assert (status, state["state"]) == (200, "you"), state
    # The take-over answered once the agent had paused at a step boundary.
    kinds = [e["kind"] for e in await asyncio.to_thread(agent_events, live_namek, sandbox_id, run["id"])]
    assert kinds[-1] == "agent.paused", kinds
    steps_then = kinds.count("agent.step")
    async with page_devtools(live_namek, sandbox_id, "/demo/") as cdp:
        read = "[location.href, document.body.innerText, [...document.querySelectorAll('input')].map(i => i.value)]"
        before = await cdp.evaluate(read)
        await asyncio.sleep(2.5)
        assert await cdp.evaluate(read) == before, "the page changed while the agent was paused"
        assert await cdp.evaluate(PROBE) == "ready"
        async with screen(live_namek, sandbox_id, "owner") as holder:
            for letter in "hi":
                await holder.send(key_event(True, ord(letter)))
                await holder.send(key_event(False, ord(letter)))
            assert (await wait_value(cdp, "hi"))[0] == "hi", "the holder's typing did not reach the page"
            await asyncio.sleep(1.0)
        kinds = [e["kind"] for e in await asyncio.to_thread(agent_events, live_namek, sandbox_id, run["id"])]
        assert kinds.count("agent.step") == steps_then, "the agent stepped while a person drove"
        await cdp.evaluate("document.getElementById('probe').remove(); 'gone'")

    note = "NOTE-5151: the customer wants the blue lamp"
    status, state = await api(live_namek, "POST", f"/api/sandboxes/{sandbox_id}/handback", body={"note": note})
    # The agent drives again; its run reads "paused" until the runner has resumed.
    assert status == 200 and state["state"] in ("agent", "paused") and state["user"] is None, state
    resumed = await asyncio.to_thread(wait_event, live_namek, sandbox_id, run["id"], "agent.resumed")
    assert resumed["data"]["note"] == note
    run = await asyncio.to_thread(wait_run, live_namek, run["id"], ("done", "failed"))
    assert run["status"] == "done", run
    inputs = live_namek.data_dir / "runs" / str(run["id"]) / "model-inputs.jsonl"
    calls = [json.loads(line) for line in inputs.read_text().splitlines()]
    with_note = [i for i, call in enumerate(calls) if "NOTE-5151" in json.dumps(call)]
    assert with_note and with_note[0] > 0, "the note is in the model's input after the hand-back"

    # The whole sequence, in order, with its durations.
    page = (await api(live_namek, "GET", f"/api/sandboxes/{sandbox_id}/events?limit=1000"))[1]["events"]
    sequence = [
        e["kind"]
        for e in page
        if e["kind"].startswith("control.") or e["kind"] in ("agent.paused", "agent.resumed", "agent.done")
    ]
    assert sequence == [
        "control.requested",
        "agent.paused",
        "control.granted",
        "control.handed_back",
        "agent.resumed",
        "agent.done",
    ], sequence
    granted = next(e for e in page if e["kind"] == "control.granted")
    handed = next(e for e in page if e["kind"] == "control.handed_back")
    assert granted["data"]["agent"] == "paused" and granted["data"]["waited"] >= 0 and "paused in" in granted["text"]
    assert handed["data"]["seconds"] >= 2.5 and handed["data"]["inputs"]["keys"] == 4
    assert handed["data"]["note"] == note and note in handed["text"]


# --- two web processes, one Redis -----------------------------------------------------------------


@pytest.fixture
def redis_namek(tmp_path: Path) -> Iterator[tuple[LiveNamek, str]]:
    """A Namek whose two Daphne processes share a real Redis channel layer; a short lapse."""
    with redis_server(tmp_path) as redis:
        namek = LiveNamek(tmp_path, REDIS_URL=redis.url, NAMEK_CONTROL_LAPSE="3")
        try:
            namek.start()
            with namek.second_daphne() as (other, _process):
                yield namek, f"ws://127.0.0.1:{other}"
        finally:
            namek.stop()


async def test_a_takeover_through_one_daphne_flips_connections_on_the_other_and_lapses(
    redis_namek: tuple[LiveNamek, str],
) -> None:
    namek, other = redis_namek
    box = await asyncio.to_thread(namek.create_sandbox)
    sandbox_id = box["id"]
    async with page_devtools(namek, sandbox_id) as cdp:
        assert await cdp.evaluate(PROBE) == "ready"
        async with screen(namek, sandbox_id, "owner", other) as holder:
            await holder.send(key_event(True, ord("x")))
            await holder.send(key_event(False, ord("x")))
            await asyncio.sleep(1.0)
            assert await probe_state(cdp) == ["", 0]
            # Requested through the first Daphne; the socket is served by the second.
            status, _ = await api(namek, "POST", f"/api/sandboxes/{sandbox_id}/takeover")
            assert status == 200
            await holder.send(key_event(True, ord("y")))
            await holder.send(key_event(False, ord("y")))
            assert (await wait_value(cdp, "y"))[0] == "y"
            # Connected, the holder keeps control past the lapse time.
            await asyncio.sleep(4.5)
            assert (await api(namek, "GET", f"/api/sandboxes/{sandbox_id}/control"))[1]["state"] == "you"
        # Every connection gone: after NAMEK_CONTROL_LAPSE (3 s) control lapses to nobody.
        gone = time.monotonic()
        state: dict[str, Any] = {}
        while time.monotonic() - gone < 15:
            state = (await api(namek, "GET", f"/api/sandboxes/{sandbox_id}/control"))[1]
            if state["state"] == "nobody":
                break
            await asyncio.sleep(0.25)
        assert state["state"] == "nobody", state
        assert time.monotonic() - gone >= 2.5
    lapsed = (await asyncio.to_thread(control_events, namek, sandbox_id))[-1]
    assert lapsed["kind"] == "control.lapsed" and lapsed["data"]["user"] == "owner"
    assert lapsed["data"]["inputs"]["keys"] == 2
    await asyncio.to_thread(namek.delete_sandbox, sandbox_id)

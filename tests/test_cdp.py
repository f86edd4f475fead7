"""``/ws/sandboxes/<id>/cdp/``: the sandbox's Chromium over CDP through a real Namek
(supervisor, bubblewrap, Chromium, Daphne), as Playwright and raw CDP clients meet it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.browser_session import login
from tests.cast import PASSWORD
from tests.live import LiveNamek, ready_sandbox
from viewer.cdp_relay import MAX_CLIENT_MESSAGE
from viewer.closecodes import Close, reason

pytestmark = pytest.mark.processes

MiB = 1024 * 1024


def cdp_url(namek: LiveNamek, sandbox_id: int) -> str:
    return f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/cdp/"


def bearer(namek: LiveNamek, who: str = "owner") -> dict[str, str]:
    return {"Authorization": f"Bearer {namek.token(who)}"}


@pytest.fixture(scope="module")
def box(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    """One ready sandbox for the tests of this module that do not need a fresh one."""
    with ready_sandbox(live_namek, name="cdp box") as created:
        yield created


class Cdp:
    """A bare CDP client over one websocket: commands by id, events skipped."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        return self.next_id

    async def reply(self, command_id: int, timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == command_id:
                    return dict(message)

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        answer = await self.reply(await self.send(method, params, session))
        assert "error" not in answer, answer
        return answer["result"]

    async def page_session(self, title: str | None = None) -> str:
        """A flat session on the sandbox's page (the one titled ``title``, if given)."""
        targets = (await self.call("Target.getTargets"))["targetInfos"]
        pages = [t for t in targets if t["type"] == "page" and (title is None or t["title"] == title)]
        assert pages, targets
        attached = await self.call("Target.attachToTarget", {"targetId": pages[0]["targetId"], "flatten": True})
        return str(attached["sessionId"])

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"].get("value")


async def closed_with(url: str, headers: dict[str, str], *frames: str | bytes) -> tuple[int | None, str]:
    """Connect, send ``frames``, and return the close code and reason the server ends with."""
    async with connect(url, additional_headers=headers, open_timeout=10, max_size=8 * MiB) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            async with asyncio.timeout(15):
                while True:
                    await ws.recv()
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return None, f"no close frame ({closed})"
            return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("unreachable")


async def still_serves(namek: LiveNamek, sandbox_id: int) -> None:
    async with connect(cdp_url(namek, sandbox_id), additional_headers=bearer(namek), open_timeout=10) as ws:
        version = await Cdp(ws).call("Browser.getVersion")
        assert version["product"].startswith("Chrome/")


async def json_version(socket_path: str) -> dict[str, Any]:
    """``/json/version`` straight from the sandbox's DevTools socket, as the backend has it."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        writer.write(b"GET /json/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        return dict(json.loads(await reader.readexactly(length)))
    finally:
        writer.close()


# --- driving the sandbox ----------------------------------------------------------------


@pytest.mark.browser
async def test_playwright_drives_the_sandbox_over_cdp_through_namek(live_namek: LiveNamek, sandbox: Any) -> None:
    from playwright.async_api import async_playwright

    url = cdp_url(live_namek, sandbox["id"])
    async with async_playwright() as playwright:
        browser = await playwright.chromium.connect_over_cdp(url, headers=bearer(live_namek), timeout=20000)
        pages = [page for context in browser.contexts for page in context.pages]
        titles = [await page.title() for page in pages]
        assert sandbox["name"] in titles, titles
        page = pages[titles.index(sandbox["name"])]
        assert await page.text_content("h1") == sandbox["name"]
        await page.evaluate("document.title = 'driven through Namek'; document.body.dataset.by = 'playwright'")

        # A second, independent CDP connection through Namek sees the change.
        async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
            other = Cdp(ws)
            session = await other.page_session("driven through Namek")
            assert await other.evaluate(session, "document.body.dataset.by") == "playwright"
            # ... and drives the same page: Playwright sees what it did.
            await other.evaluate(session, "document.body.dataset.back = 'raw cdp'")
        assert await page.evaluate("document.body.dataset.back") == "raw cdp"
        # Disconnecting Playwright (connect_over_cdp) leaves the browser running.
        await browser.close()

    # The sandbox's Chromium is still there, with the page as Playwright left it.
    assert (await json_version(live_namek.browser_socket(sandbox["id"])))["webSocketDebuggerUrl"]
    assert live_namek.api("GET", f"/api/sandboxes/{sandbox['id']}")[1]["phase"] == "ready"
    async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
        again = Cdp(ws)
        session = await again.page_session("driven through Namek")
        assert await again.evaluate(session, "document.body.dataset.by") == "playwright"


async def test_a_raw_client_navigates_and_big_responses_arrive(live_namek: LiveNamek, box: Any) -> None:
    async with connect(cdp_url(live_namek, box["id"]), additional_headers=bearer(live_namek), max_size=8 * MiB) as ws:
        cdp = Cdp(ws)
        session = await cdp.page_session()
        await cdp.call("Page.enable", session=session)
        await cdp.call("Page.navigate", {"url": "data:text/html,<title>navigated</title><p>hello"}, session)
        async with asyncio.timeout(10):
            while await cdp.evaluate(session, "document.title") != "navigated":
                await asyncio.sleep(0.1)
        # 3 MiB responses (under Daphne's 4 MiB) pass whole, several in a row.
        for _ in range(3):
            assert len(await cdp.evaluate(session, "'x'.repeat(3 * 1024 * 1024)")) == 3 * MiB
        shot = await cdp.call("Page.captureScreenshot", {"format": "png"}, session)
        assert len(shot["data"]) > 1000
        # Over Daphne's limit, a response becomes a CDP error for its id and session ...
        command = await cdp.send(
            "Runtime.evaluate", {"expression": "'y'.repeat(5 * 1024 * 1024)", "returnByValue": True}, session
        )
        answer = await cdp.reply(command)
        assert answer["sessionId"] == session
        assert "over the relay's limit" in answer["error"]["message"]
        # ... and the connection goes on.
        assert await cdp.evaluate(session, "1 + 1") == 2


async def test_a_browser_message_over_64_mib_closes_1011(live_namek: LiveNamek, box: Any) -> None:
    url = cdp_url(live_namek, box["id"])
    async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
        cdp = Cdp(ws)
        session = await cdp.page_session()
        await cdp.send(
            "Runtime.evaluate", {"expression": "'w'.repeat(65 * 1024 * 1024)", "returnByValue": True}, session
        )
        with pytest.raises(ConnectionClosed) as ended:
            await cdp.reply(-1, timeout=20)
    assert ended.value.rcvd is not None
    assert (ended.value.rcvd.code, ended.value.rcvd.reason) == (
        1011,
        f"the sandbox cannot be reached: a browser message over {64 * MiB} bytes",
    )
    await still_serves(live_namek, box["id"])


async def test_when_the_browser_goes_the_client_gets_1011_and_reconnects(live_namek: LiveNamek, sandbox: Any) -> None:
    url = cdp_url(live_namek, sandbox["id"])
    async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
        before = (await Cdp(ws).call("Target.getTargets"))["targetInfos"]
        restart = asyncio.create_task(
            asyncio.to_thread(live_namek.api, "POST", f"/api/sandboxes/{sandbox['id']}/restart-browser")
        )
        with pytest.raises(ConnectionClosed) as ended:
            await asyncio.wait_for(ws.recv(), 20)
        assert ended.value.rcvd is not None
        assert (ended.value.rcvd.code, ended.value.rcvd.reason) == (
            1011,
            "the sandbox cannot be reached: the browser closed the DevTools connection",
        )
        assert (await restart)[0] == 200
    async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
        after = (await Cdp(ws).call("Target.getTargets"))["targetInfos"]
    assert {t["targetId"] for t in after}.isdisjoint(t["targetId"] for t in before), "a new browser"


# --- refusals ---------------------------------------------------------------------------


async def test_refusals_get_their_codes(live_namek: LiveNamek, box: Any) -> None:
    url = cdp_url(live_namek, box["id"])
    origin = {"Origin": live_namek.base_url}
    assert await closed_with(url, origin) == (4401, "not logged in")
    assert await closed_with(url, {}) == (4401, "not logged in")
    assert await closed_with(url, bearer(live_namek, "outsider")) == (4403, "not allowed")
    cookie = login(live_namek.base_url, "owner", PASSWORD)[1]
    assert await closed_with(url, {"Cookie": cookie, "Origin": "http://evil.example"}) == (4403, "not allowed")
    assert await closed_with(url, {"Cookie": cookie}) == (4403, "not allowed")  # a cookie needs an Origin
    outsider_cookie = login(live_namek.base_url, "outsider", PASSWORD)[1]
    assert (await closed_with(url, {"Cookie": outsider_cookie, "Origin": live_namek.base_url}))[0] == 4403
    unknown = cdp_url(live_namek, 987654)
    assert await closed_with(unknown, bearer(live_namek)) == (4404, "no such sandbox")
    # The owner's cookie with the right Origin is let in, as is the staff's token.
    async with connect(url, additional_headers={"Cookie": cookie, **origin}, open_timeout=10) as ws:
        assert "product" in await Cdp(ws).call("Browser.getVersion")
    await still_serves(live_namek, box["id"])
    async with connect(url, additional_headers=bearer(live_namek, "staff"), open_timeout=10) as ws:
        assert "product" in await Cdp(ws).call("Browser.getVersion")


async def test_a_stopped_sandbox_closes_1011(live_namek: LiveNamek) -> None:
    created = live_namek.create_sandbox(name="cdp short-lived")
    live_namek.delete_sandbox(created["id"])
    code, reason = await closed_with(cdp_url(live_namek, created["id"]), bearer(live_namek))
    assert code == 1011
    assert "stopped" in reason


# --- bad input --------------------------------------------------------------------------

BAD_MESSAGES: list[tuple[str, str | bytes]] = [
    ("binary", json.dumps({"id": 1, "method": "Browser.getVersion"}).encode()),
    ("malformed JSON", '{"id": 1, "method": "Browser.getVersion"'),
    ("not JSON", "Browser.getVersion"),
    ("empty", ""),
    ("blank", " "),
    ("no id", '{"method": "Browser.getVersion"}'),
    ("no method", '{"id": 1}'),
    ("string id", '{"id": "1", "method": "Browser.getVersion"}'),
    ("boolean id", '{"id": true, "method": "Browser.getVersion"}'),
    ("float id", '{"id": 1.5, "method": "Browser.getVersion"}'),
    ("method not a string", '{"id": 1, "method": ["Browser.getVersion"]}'),
    ("a list", '[{"id": 1, "method": "Browser.getVersion"}]'),
    ("a number", "42"),
    ("null", "null"),
    ("nested too deeply", "[" * 100_000),
]


@pytest.mark.parametrize("frame", [frame for _, frame in BAD_MESSAGES], ids=[name for name, _ in BAD_MESSAGES])
async def test_bad_input_closes_4400(live_namek: LiveNamek, box: Any, frame: str | bytes) -> None:
    good = json.dumps({"id": 1, "method": "Browser.getVersion"})
    code, _ = await closed_with(cdp_url(live_namek, box["id"]), bearer(live_namek), good, frame)
    assert code == 4400
    await still_serves(live_namek, box["id"])


async def test_oversize_messages_are_closed(live_namek: LiveNamek, box: Any) -> None:
    url = cdp_url(live_namek, box["id"])

    def command(length: int, filler: str = "x") -> str:
        """A command of ``length`` characters."""
        text = json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": ""}})
        return text.replace('""', '"' + filler * (length - len(text)) + '"')

    assert len(command(MAX_CLIENT_MESSAGE)) == MAX_CLIENT_MESSAGE
    # At the relay's limit a command passes (Chromium answers it: no session, an error) ...
    async with connect(url, additional_headers=bearer(live_namek), open_timeout=10) as ws:
        await ws.send(command(MAX_CLIENT_MESSAGE))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["id"] == 1
    # ... one byte more closes 4413, also when counted in UTF-8 bytes ...
    assert await closed_with(url, bearer(live_namek), command(MAX_CLIENT_MESSAGE + 1)) == (
        4413,
        f"message too big: commands of at most {MAX_CLIENT_MESSAGE} bytes",
    )
    accented = command(MAX_CLIENT_MESSAGE // 2 + 100, "é")
    assert len(accented) < MAX_CLIENT_MESSAGE < len(accented.encode())
    assert (await closed_with(url, bearer(live_namek), accented))[0] == 4413
    # ... and over Daphne's own 4 MiB, autobahn fails the connection before the relay sees
    # the message: with its default failByDrop it drops TCP without a close frame (1006).
    code, reason = await closed_with(url, bearer(live_namek), command(4 * MiB + 1))
    assert code is None, (code, reason)
    await still_serves(live_namek, box["id"])


# --- memory and leaks -------------------------------------------------------------------


def daphne(namek: LiveNamek) -> psutil.Process:
    assert namek.daphne is not None
    return psutil.Process(namek.daphne.pid)


def open_fds(process: psutil.Process) -> int:
    return len(os.listdir(f"/proc/{process.pid}/fd"))


async def test_a_client_that_reads_nothing_is_closed_and_daphne_stays_small(live_namek: LiveNamek, box: Any) -> None:
    """30 responses of 3 MiB to a client that reads none: Daphne holds about one window,
    the relay stops reading Chromium and, NAMEK_RELAY_STALL_SECONDS (3 s here) after the
    window filled, closes the client with 4408; Autobahn resets a peer that does not
    answer the close within 1 s. Daphne's keepalive alone would take 50 s."""
    process = daphne(live_namek)
    url = cdp_url(live_namek, box["id"])
    log = live_namek.logs / "daphne.log"
    log_before = log.stat().st_size
    # max_queue=1: the client's websockets library stops reading the socket at once.
    async with connect(url, additional_headers=bearer(live_namek), max_size=8 * MiB, max_queue=1) as ws:
        cdp = Cdp(ws)
        session = await cdp.page_session()
        before = peak = process.memory_info().rss
        started = time.monotonic()
        for _ in range(30):
            await cdp.send(
                "Runtime.evaluate", {"expression": "'z'.repeat(3 * 1024 * 1024)", "returnByValue": True}, session
            )
        # Read nothing; ping (a write) to notice when the server has dropped the connection.
        with pytest.raises(ConnectionClosed):
            while time.monotonic() - started < 20:
                peak = max(peak, process.memory_info().rss)
                await ws.ping()
                await asyncio.sleep(0.1)
            pytest.fail("the server did not drop a client that read nothing for 20 s")
        # Without the window Daphne would hold ~90 MiB (and copies); with it about one
        # window, a message or two and the upstream queue.
        assert peak - before < 40 * MiB, f"Daphne grew by {(peak - before) / MiB:.0f} MiB"
    logged = log.read_bytes()[log_before:].decode(errors="replace")
    assert f"closing with {int(Close.TOO_SLOW)} {reason(Close.TOO_SLOW)}" in logged
    await still_serves(live_namek, box["id"])


async def test_open_close_cycles_leave_no_file_descriptors(live_namek: LiveNamek, box: Any) -> None:
    process = daphne(live_namek)
    url = cdp_url(live_namek, box["id"])
    await still_serves(live_namek, box["id"])  # warm up: database connection, imports
    await asyncio.sleep(0.5)
    baseline = open_fds(process)
    for cycle in range(30):
        kind = cycle % 3
        if kind == 0:  # a clean close
            await still_serves(live_namek, box["id"])
        elif kind == 1:  # the client vanishes without a close frame
            ws = await connect(url, additional_headers=bearer(live_namek), open_timeout=10)
            await Cdp(ws).call("Target.getTargets")
            ws.transport.abort()
            await asyncio.sleep(0.05)
        else:  # bad input: the server closes
            assert (await closed_with(url, bearer(live_namek), "not json"))[0] == 4400
    deadline = time.monotonic() + 15
    while open_fds(process) > baseline + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert open_fds(process) <= baseline + 2, f"{open_fds(process)} open, {baseline} before"
    # Every connection counted as a viewer was uncounted again.
    viewers = live_namek.manage(
        "shell", "-c", f"from sandboxes.models import Sandbox; print(Sandbox.objects.get(pk={box['id']}).viewers)"
    ).stdout.split()[-1]
    assert viewers == "0"


# --- who may drive: the checks' order, through Channels' communicator -------------------


def communicator(path: str, token: str | None = None, **scope: Any) -> WebsocketCommunicator:
    from namek_web.asgi import application

    headers = [(b"origin", b"http://127.0.0.1:8000")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    comm = WebsocketCommunicator(application, path, headers=headers)
    comm.scope.update(scope)
    return comm


async def close_message(comm: WebsocketCommunicator) -> dict[str, Any]:
    connected, _ = await comm.connect()
    assert connected, "consumers accept first, then close with a code"
    message = await comm.receive_output(timeout=5)
    assert message["type"] == "websocket.close"
    return dict(message)


@pytest.mark.django_db(transaction=True)
async def test_seeing_is_not_enough_to_drive(cast: dict, make_sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    box = await database_sync_to_async(make_sandbox)(phase="starting")
    path = f"/ws/sandboxes/{box.pk}/cdp/"
    assert (await close_message(communicator(path, cast["tokens"]["owner"])))["code"] == 1011  # past the checks
    monkeypatch.setattr("viewer.consumers.cdp.can_use", lambda user, sandbox: False)
    assert (await close_message(communicator(path, cast["tokens"]["owner"])))["code"] == 4403


@pytest.mark.django_db(transaction=True)
async def test_an_agent_runs_token_drives_its_own_sandbox_only(cast: dict, make_sandbox: Any) -> None:
    """A real run token, through the auth middleware: admitted for its sandbox (then the
    sandbox's phase decides), refused for another, and refused once the run has ended."""
    from sandboxes.models import AgentRun

    box = await database_sync_to_async(make_sandbox)(phase="starting")
    other = await database_sync_to_async(make_sandbox)(phase="starting")
    token, digest = AgentRun.new_token()
    run = await database_sync_to_async(AgentRun.objects.create)(
        sandbox=box, task="t", status="running", token_digest=digest
    )

    async def code(sandbox_id: int) -> int:
        return int((await close_message(communicator(f"/ws/sandboxes/{sandbox_id}/cdp/", token)))["code"])

    assert await code(box.pk) == 1011, "past every check, to the sandbox's phase"
    assert await code(other.pk) == 4403
    assert await code(999999) == 4404
    run.status = "done"
    await database_sync_to_async(run.save)()
    assert await code(box.pk) == 4401


@pytest.mark.django_db(transaction=True)
async def test_a_runs_token_needs_no_origin_but_a_foreign_one_is_refused(
    make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the middleware sets it for a run's token: no user, auth_method "run"."""
    from django.contrib.auth.models import AnonymousUser

    from viewer.consumers.cdp import CdpConsumer

    box = await database_sync_to_async(make_sandbox)(phase="starting")
    monkeypatch.setattr(CdpConsumer, "run_may_drive", lambda self: True)

    async def refusal(headers: list[tuple[bytes, bytes]], auth_method: str | None = "run") -> int | None:
        consumer = CdpConsumer()
        consumer.scope = {
            "type": "websocket",
            "headers": headers,
            "user": AnonymousUser(),
            "auth_method": auth_method,
            "agent_run": {"id": 7, "sandbox_id": box.pk},
            "url_route": {"kwargs": {"sandbox_id": box.pk}},
        }
        code = await consumer.refusal()
        return None if code is None else int(code)

    assert await refusal([]) is None
    assert await refusal([(b"origin", b"http://127.0.0.1:8000")]) is None
    assert await refusal([(b"origin", b"http://evil.example")]) == 4403
    assert await refusal([], auth_method=None) == 4403  # not from a token: an Origin is needed

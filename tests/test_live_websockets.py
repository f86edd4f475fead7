"""Websocket refusals against a running Daphne, as browsers and scripts meet them."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.browser_session import login
from tests.cast import PASSWORD
from tests.live import LiveNamek

pytestmark = pytest.mark.processes


async def closed_with(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """Connect, and return the close code and reason the server ends with."""
    async with connect(url, additional_headers=headers, subprotocols=["binary"], open_timeout=10) as ws:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "the server sent a close frame"
            return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def owner_cookie(live_namek: LiveNamek) -> str:
    return login(live_namek.base_url, "owner", PASSWORD)[1]


async def test_anonymous_outsider_and_unknown_sandbox_get_their_codes(live_namek: LiveNamek, sandbox: Any) -> None:
    screen = f"{live_namek.ws_base}/ws/sandboxes/{sandbox['id']}/screen/"
    origin = {"Origin": live_namek.base_url}
    assert await closed_with(screen, origin) == (4401, "not logged in")
    outsider = {"Authorization": f"Bearer {live_namek.token('outsider')}"}
    assert await closed_with(screen, outsider) == (4403, "not allowed")
    owner = {"Authorization": f"Bearer {live_namek.token('owner')}"}
    assert await closed_with(f"{live_namek.ws_base}/ws/sandboxes/987654/screen/", owner) == (4404, "no such sandbox")


async def test_a_cookie_needs_a_matching_origin(live_namek: LiveNamek, owner_cookie: str) -> None:
    url = f"{live_namek.ws_base}/ws/sandboxes/"
    code, _ = await closed_with(url, {"Cookie": owner_cookie, "Origin": "http://evil.example"})
    assert code == 4403
    code, _ = await closed_with(url, {"Cookie": owner_cookie})  # no Origin at all
    assert code == 4403
    async with connect(url, additional_headers={"Cookie": owner_cookie, "Origin": live_namek.base_url}) as ws:
        assert '"type": "snapshot"' in await ws.recv()


async def test_a_token_without_origin_is_accepted(live_namek: LiveNamek) -> None:
    headers = {"Authorization": f"Bearer {live_namek.token('owner')}"}
    async with connect(f"{live_namek.ws_base}/ws/sandboxes/", additional_headers=headers) as ws:
        assert '"type": "snapshot"' in await ws.recv()


async def test_an_outsiders_cookie_gets_4403_for_anothers_screen(live_namek: LiveNamek, sandbox: Any) -> None:
    cookie = login(live_namek.base_url, "outsider", PASSWORD)[1]
    url = f"{live_namek.ws_base}/ws/sandboxes/{sandbox['id']}/screen/"
    assert (await closed_with(url, {"Cookie": cookie, "Origin": live_namek.base_url}))[0] == 4403


async def test_a_stopped_sandboxs_screen_closes_1011(live_namek: LiveNamek) -> None:
    created = live_namek.create_sandbox(name="short-lived")
    live_namek.delete_sandbox(created["id"])
    headers = {"Authorization": f"Bearer {live_namek.token('owner')}"}
    code, reason = await closed_with(f"{live_namek.ws_base}/ws/sandboxes/{created['id']}/screen/", headers)
    assert code == 1011
    assert "stopped" in reason

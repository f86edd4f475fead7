"""Namek scaled out on one machine: two Daphne processes sharing one real Redis channel
layer (Debian's redis-server) and one PostgreSQL database (Debian's postgresql, a
throwaway cluster), both started and stopped here, with the local supervisor behind them.

Bad input tried: none beyond the other modules'; this checks that what one web process
does, every other one shows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page
from websockets.asyncio.client import connect

from tests.cast import PASSWORD
from tests.live import LiveNamek, postgres_server, redis_server
from tests.test_control_live import race_takeovers

pytestmark = pytest.mark.processes


class Scaled:
    def __init__(self, namek: LiveNamek, other_port: int) -> None:
        self.namek = namek
        self.urls = {"A": namek.base_url, "B": f"http://127.0.0.1:{other_port}"}
        self.ws = {"A": namek.ws_base, "B": f"ws://127.0.0.1:{other_port}"}

    def api(self, via: str, method: str, path: str, who: str = "owner", body: Any = None) -> tuple[int, Any]:
        """The API of web process ``via`` ("A" or "B")."""
        base, self.namek.base_url = self.namek.base_url, self.urls[via]
        try:
            return self.namek.api(method, path, who, body)
        finally:
            self.namek.base_url = base


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scaled]:
    base = tmp_path_factory.mktemp("scaled")
    with postgres_server() as database_url, redis_server(base) as redis:
        namek = LiveNamek(base, DATABASE_URL=database_url, REDIS_URL=redis.url)
        try:
            namek.start()
            with namek.second_daphne() as (port, _process):
                yield Scaled(namek, port)
        finally:
            namek.stop()


async def next_event(ws: Any, kind: str, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["kind"] == kind:
                return event


@pytest.mark.parametrize(("writer", "reader"), [("A", "B"), ("B", "A")])
async def test_an_event_recorded_through_one_web_process_reaches_a_subscriber_of_the_other(
    scaled: Scaled, writer: str, reader: str
) -> None:
    status, box = await asyncio.to_thread(scaled.api, writer, "POST", "/api/sandboxes", "owner", {"name": "scaled"})
    assert status == 201, box
    headers = {"Authorization": f"Bearer {scaled.namek.token()}"}
    url = f"{scaled.ws[reader]}/ws/sandboxes/{box['id']}/events/?after={box['last_event_seq']}"
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        await next_event(ws, "sandbox.ready", timeout=45)  # recorded by the supervisor, a third process
        text = f"noted through {writer}"
        note = {"text": text}
        status, _ = await asyncio.to_thread(
            scaled.api, writer, "POST", f"/api/sandboxes/{box['id']}/events", "owner", note
        )
        assert status == 201
        assert (await next_event(ws, "person.note"))["text"] == text
    assert (await asyncio.to_thread(scaled.api, reader, "DELETE", f"/api/sandboxes/{box['id']}"))[0] == 200


async def open_page(browser: Browser, base_url: str, sandbox_id: int) -> Page:
    page = await (await browser.new_context()).new_page()
    await page.goto(base_url + "/")
    await page.fill("input[name=username]", "viewer")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#sandbox-rows")
    await page.goto(f"{base_url}/sandboxes/{sandbox_id}/")
    return page


async def shows(page: Page, phase: str, banner: str) -> None:
    await page.wait_for_function(
        "([phase, banner]) => document.getElementById('phase').textContent === phase"
        " && document.getElementById('control-banner').textContent === banner",
        arg=[phase, banner],
        timeout=20000,
    )


@pytest.mark.browser
async def test_a_sandbox_page_served_by_either_web_process_shows_the_same_live_state(
    scaled: Scaled, browser: Browser
) -> None:
    box = await asyncio.to_thread(scaled.namek.create_sandbox, name="same state")
    pages = [await open_page(browser, scaled.urls[via], box["id"]) for via in ("A", "B")]
    try:
        for page in pages:
            await shows(page, "ready", "Nobody is driving")
        # A take-over through one process, a delete through the other: both pages follow.
        status, _ = await asyncio.to_thread(scaled.api, "A", "POST", f"/api/sandboxes/{box['id']}/takeover", "operator")
        assert status == 200
        for page in pages:
            await shows(page, "ready", "operator is driving")
        assert (await asyncio.to_thread(scaled.api, "B", "DELETE", f"/api/sandboxes/{box['id']}"))[0] == 200
        for page in pages:
            await shows(page, "stopped", "Nobody is driving")
    finally:
        for page in pages:
            await page.context.close()


def test_operators_racing_through_both_web_processes_on_postgresql_get_one_holder(scaled: Scaled) -> None:
    """PostgreSQL's row locks, not SQLite's one writer, decide the race here."""
    box = scaled.namek.create_sandbox(name="race")
    race_takeovers(scaled.namek, box["id"], [scaled.urls["A"], scaled.urls["B"]])
    assert scaled.namek.api("DELETE", f"/api/sandboxes/{box['id']}")[0] == 200


def test_the_database_is_postgresql(scaled: Scaled) -> None:
    out = scaled.namek.manage("shell", "-c", "from django.db import connection; print(connection.vendor)").stdout
    assert out.strip().splitlines()[-1] == "postgresql"


def test_migrations_are_complete_on_postgresql(scaled: Scaled) -> None:
    result = scaled.namek.manage("makemigrations", "--check", "--dry-run", check=False)
    assert result.returncode == 0, result.stdout + result.stderr

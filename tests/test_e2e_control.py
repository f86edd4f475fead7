"""Taking over a sandbox from its page, in Debian's Chromium driven by Playwright: an
operator drives (keys reach the sandbox's browser through noVNC), a viewer watches live
and cannot type, and the operator hands back with a note."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page
from websockets.asyncio.client import unix_connect

from tests.cast import PASSWORD
from tests.live import LiveNamek, ready_sandbox
from tests.test_screen_relay import Cdp, cdp_page_id

pytestmark = [pytest.mark.processes, pytest.mark.browser]

VIEWPORT = {"width": 1400, "height": 900}

#: a big text field over the sandbox's start page: a click in the middle of the screen
#: lands in it; no caret blinks, so the screen only changes when its text does
PROBE = """(() => {
    document.getElementById('probe')?.remove();
    const probe = document.createElement('input');
    probe.id = 'probe';
    probe.autocomplete = 'off';
    probe.style.cssText = 'position:fixed;left:5%;top:25%;width:90%;height:50%;font-size:96px;'
        + 'caret-color:transparent;z-index:2147483647;box-sizing:border-box';
    document.body.append(probe);
    probe.focus();
    return document.activeElement === probe;
})()"""


async def log_in(context: BrowserContext, base_url: str, username: str) -> Page:
    page = await context.new_page()
    await page.goto(base_url + "/")
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#sandbox-rows")
    return page


async def open_sandbox(page: Page, base_url: str, sandbox_id: int) -> None:
    await page.goto(f"{base_url}/sandboxes/{sandbox_id}/")
    await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'", timeout=20000)
    await page.wait_for_function(
        "document.getElementById('terminal-status').textContent.startsWith('Live')", timeout=20000
    )


async def banner_says(page: Page, text: str, timeout: float = 20000) -> None:
    await page.wait_for_function(
        "(text) => document.getElementById('control-banner').textContent === text", arg=text, timeout=timeout
    )


async def canvas_shot(page: Page) -> bytes:
    return await page.locator("#screen canvas").screenshot()


async def steady_canvas(page: Page, timeout: float = 10) -> bytes:
    """The screen once two shots half a second apart agree."""
    deadline = time.monotonic() + timeout
    last = await canvas_shot(page)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        shot = await canvas_shot(page)
        if shot == last:
            return shot
        last = shot
    return last


async def probe_value(cdp: Cdp) -> Any:
    return await cdp.evaluate("document.getElementById('probe')?.value")


async def wait_probe(cdp: Cdp, wanted: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    value = await probe_value(cdp)
    while value != wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await probe_value(cdp)
    return value


async def nobody_drives_yet(operator: Page, viewer: Page) -> None:
    for page in (operator, viewer):
        await banner_says(page, "Nobody is driving")
        assert await page.get_attribute("#control-banner", "data-state") == "nobody"
        assert await page.locator("#handback-button").is_hidden()
        assert await page.locator("#clipboard-panel").is_hidden()
    assert await operator.locator("#takeover-button").is_visible()
    assert await viewer.locator("#takeover-button").count() == 1
    assert await viewer.locator("#takeover-button").is_hidden(), "viewers cannot take over"
    assert await viewer.text_content("#terminal-status") == "Live (read-only)"


async def take_over(operator: Page, viewer: Page, badge: Locator) -> None:
    """The operator takes over: its banner, then the viewer's, without a reload."""
    await operator.click("#takeover-button")
    await banner_says(operator, "You are driving")
    await banner_says(viewer, "operator is driving")
    await badge.filter(has_text="You are driving").wait_for(timeout=10000)
    assert await operator.get_attribute("#control-bar", "data-state") == "you"
    assert await viewer.get_attribute("#control-bar", "data-state") == "person"
    assert await operator.locator("#takeover-button").is_hidden()
    assert await operator.locator("#handback-button").is_visible()
    assert await operator.text_content("#handback-button") == "Hand back"
    assert await operator.locator("#clipboard-panel").is_visible()
    for hidden in ("#clipboard-panel", "#handback-button", "#takeover-button"):
        assert await viewer.locator(hidden).is_hidden(), hidden
    # Taking over moves the keyboard to the screen.
    assert await operator.evaluate("document.activeElement?.tagName") == "CANVAS"
    # The terminal follows the lease too.
    await operator.wait_for_function("document.getElementById('terminal-status').textContent === 'Live'", timeout=10000)
    assert await viewer.text_content("#terminal-status") == "Live (read-only)"


async def only_the_driver_types(operator: Page, viewer: Page, cdp: Cdp, before: bytes) -> None:
    # The operator clicks into the probe through noVNC and types.
    await operator.locator("#screen canvas").click()
    await operator.keyboard.type("hello", delay=30)
    assert await wait_probe(cdp, "hello") == "hello"

    # The viewer's screen shows it.
    deadline = time.monotonic() + 10
    after = await canvas_shot(viewer)
    while after == before and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        after = await canvas_shot(viewer)
    assert after != before, "the viewer's screen did not change while the operator typed"

    # The viewer's clicks and keys reach nothing.
    await viewer.locator("#screen canvas").click()
    await viewer.keyboard.type("XYZ", delay=30)
    await asyncio.sleep(1)
    assert await probe_value(cdp) == "hello"


async def hand_back(operator: Page, viewer: Page, badge: Locator) -> None:
    """The operator hands back with a note: both banners say so, and the log."""
    await operator.fill("input[name=handback-note]", "all yours, <b>agent</b>")
    await operator.click("#handback-button")
    for page in (operator, viewer):
        await banner_says(page, "Nobody is driving")
        row = page.locator("#event-log li[data-kind='control.handed_back']").last
        await row.wait_for(timeout=10000)
        text = await row.locator(".event-text").text_content() or ""
        assert "operator handed back" in text and "all yours, <b>agent</b>" in text, text
        assert await page.locator("#clipboard-panel").is_hidden()
    assert await operator.locator("#takeover-button").is_visible()
    assert await operator.input_value("input[name=handback-note]") == ""
    await badge.filter(has_text="Nobody is driving").wait_for(timeout=10000)
    await operator.wait_for_function(
        "document.getElementById('terminal-status').textContent === 'Live (read-only)'", timeout=10000
    )


async def test_an_operator_takes_over_types_and_hands_back_while_a_viewer_watches(
    live_namek: LiveNamek, browser: Browser
) -> None:
    base = live_namek.base_url
    errors: list[str] = []
    with ready_sandbox(live_namek, name="e2e control") as sandbox:
        sandbox_id = sandbox["id"]
        operator_context = await browser.new_context(viewport=VIEWPORT)
        viewer_context = await browser.new_context(viewport=VIEWPORT)
        try:
            operator = await log_in(operator_context, base, "operator")
            viewer = await log_in(viewer_context, base, "viewer")
            for page in (operator, viewer):
                page.on("pageerror", lambda error: errors.append(str(error)))
            # The viewer sees every sandbox but may not create one.
            assert await viewer.locator("#create-form").count() == 0
            assert await operator.locator("#create-form").count() == 1
            # The operator's dashboard, in a second tab, follows who drives.
            dashboard = await operator_context.new_page()
            await dashboard.goto(base + "/")
            badge = dashboard.locator(f"#sandbox-rows tr[data-sandbox-id='{sandbox_id}'] .control-badge")
            await badge.wait_for()
            assert await badge.text_content() == "Nobody is driving"

            await open_sandbox(operator, base, sandbox_id)
            await open_sandbox(viewer, base, sandbox_id)
            await nobody_drives_yet(operator, viewer)

            socket_path = live_namek.browser_socket(sandbox_id)
            page_id = await asyncio.to_thread(cdp_page_id, socket_path)
            async with unix_connect(socket_path, f"ws://127.0.0.1/devtools/page/{page_id}", max_size=None) as ws:
                cdp = Cdp(ws)
                assert await cdp.evaluate(PROBE) is True
                before = await steady_canvas(viewer)
                await take_over(operator, viewer, badge)
                await only_the_driver_types(operator, viewer, cdp, before)

            await hand_back(operator, viewer, badge)
            assert errors == []
        finally:
            await operator_context.close()
            await viewer_context.close()


async def test_take_over_from_the_dashboard_opens_the_page_driving(live_namek: LiveNamek, browser: Browser) -> None:
    """An owner's dashboard offers Take over on its ready sandbox; a viewer's offers none."""
    with ready_sandbox(live_namek, name="from the dashboard") as box:
        owner = await browser.new_context(viewport=VIEWPORT)
        viewer = await browser.new_context(viewport=VIEWPORT)
        try:
            watching = await log_in(viewer, live_namek.base_url, "viewer")
            row = watching.locator(f"tr[data-sandbox-id='{box['id']}']")
            await row.wait_for()
            assert await row.locator("button.takeover").count() == 0
            page = await log_in(owner, live_namek.base_url, "owner")
            await page.click(f"tr[data-sandbox-id='{box['id']}'] button.takeover")
            await page.wait_for_url(f"**/sandboxes/{box['id']}/")
            await banner_says(page, "You are driving")
            await watching.wait_for_function(
                "(id) => document.querySelector(`tr[data-sandbox-id='${id}'] .control-badge`)"
                "?.textContent === 'owner is driving'",
                arg=box["id"],
                timeout=10000,
            )
        finally:
            await owner.close()
            await viewer.close()

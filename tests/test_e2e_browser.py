"""A new user's path, end to end, in Debian's Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.cast import PASSWORD
from tests.live import LiveNamek, marked_processes

pytestmark = [pytest.mark.processes, pytest.mark.browser]


async def log_in(page: Page, base_url: str, username: str = "owner") -> None:
    await page.goto(base_url + "/")
    assert "/login/" in page.url, "the dashboard sends a stranger to the login form"
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#create-form")


def hex_colour(rgb: list[int]) -> str:
    return "#" + "".join(f"{value:02x}" for value in rgb[:3])


async def canvas_pixel(page: Page, x: int, y: int) -> list[int]:
    return list(
        await page.evaluate(
            "([x, y]) => Array.from(document.querySelector('#screen canvas')"
            ".getContext('2d').getImageData(x, y, 1, 1).data)",
            [x, y],
        )
    )


async def test_log_in_create_watch_the_banner_and_delete(live_namek: LiveNamek, browser: Browser) -> None:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, live_namek.base_url)

    await page.fill("#create-form input[name=name]", "e2e banner")
    await page.click("#create-button")
    row = page.locator("#sandbox-rows tr", has_text="e2e banner")
    await row.locator("td.phase-ready").wait_for(timeout=45000)
    sandbox_id = int(await row.get_attribute("data-sandbox-id") or 0)
    status, sandbox = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}")
    assert status == 200

    await row.get_by_role("link", name="Open").click()
    await page.wait_for_selector("#screen canvas")
    await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'")

    # The canvas holds the remote framebuffer at its own size (noVNC scales it with CSS):
    # below Chromium's toolbar, the start page is the sandbox's banner colour.
    size = await page.evaluate(
        "(() => { const c = document.querySelector('#screen canvas'); return [c.width, c.height]; })()"
    )
    assert size == [1280, 800]
    deadline = time.monotonic() + 20
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = await canvas_pixel(page, 640, 650)
        if hex_colour(seen) == sandbox["banner_color"]:
            break
        await asyncio.sleep(0.25)
    assert hex_colour(seen) == sandbox["banner_color"], f"canvas shows {seen}, banner is {sandbox['banner_color']}"

    await page.click("#delete-button")
    await page.wait_for_function("document.getElementById('phase').textContent === 'stopped'", timeout=30000)
    assert "stopped" in (await page.text_content("#screen-status") or "")
    assert not live_namek.sandbox_dir(sandbox_id).exists()
    leftovers = [pid for pid in marked_processes(live_namek.data_dir) if _sandbox_of(pid) == sandbox_id]
    assert leftovers == []
    assert errors == []
    await page.close()


def _sandbox_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            for item in handle.read().split(b"\0"):
                if item.startswith(b"NAMEK_SANDBOX_ID="):
                    return int(item.split(b"=", 1)[1])
    except OSError:
        return None
    return None


async def test_the_dashboard_shows_phase_changes_live(live_namek: LiveNamek, browser: Browser) -> None:
    page = await browser.new_page()
    await log_in(page, live_namek.base_url)
    created: Any = live_namek.create_sandbox(name="made elsewhere")
    try:
        row = page.locator("#sandbox-rows tr", has_text="made elsewhere")
        await row.locator("td.phase-ready").wait_for(timeout=15000)
    finally:
        live_namek.delete_sandbox(created["id"])
    await row.wait_for(state="detached", timeout=15000)
    await page.close()


async def test_a_page_of_another_users_sandbox_is_refused(live_namek: LiveNamek, browser: Browser) -> None:
    created = live_namek.create_sandbox(who="outsider", name="not yours")
    try:
        page = await browser.new_page()
        await log_in(page, live_namek.base_url)
        response = await page.goto(f"{live_namek.base_url}/sandboxes/{created['id']}/")
        assert response is not None and response.status == 403
        assert "Not allowed" in await page.content()
        await page.close()
    finally:
        live_namek.delete_sandbox(created["id"], who="outsider")


async def test_restart_browser_from_the_page_says_what_happened(live_namek: LiveNamek, browser: Browser) -> None:
    created = live_namek.create_sandbox(name="restart from page")
    try:
        page = await browser.new_page()
        await log_in(page, live_namek.base_url)
        await page.goto(f"{live_namek.base_url}/sandboxes/{created['id']}/")
        await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'")
        await page.click("#restart-button")
        await page.wait_for_function(
            "document.getElementById('screen-status').textContent.startsWith('Chromium restarted by owner')",
            timeout=30000,
        )
        assert "1 restart so far" in (await page.text_content("#screen-status") or "")
        await page.close()
    finally:
        live_namek.delete_sandbox(created["id"])


XSS = '<img src=x onerror="window.__xss = 1">'


async def test_the_three_panes_are_live_on_one_page(
    live_namek: LiveNamek, browser: Browser, sandbox: dict[str, Any]
) -> None:
    """Screen, terminal and event log; markup in an event stays text; a thumbnail opens
    its screenshot."""
    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    await log_in(page, live_namek.base_url)
    # Typing reaches the shell only from whoever holds control (test_e2e_control.py).
    assert live_namek.api("POST", f"/api/sandboxes/{sandbox['id']}/takeover")[0] == 200
    await page.goto(f"{live_namek.base_url}/sandboxes/{sandbox['id']}/")

    # The screen and the terminal are live, and typing in the terminal runs in the shell.
    await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'")
    await page.wait_for_function("document.getElementById('terminal-status').textContent === 'Live'")
    await page.click("#terminal")
    await page.keyboard.type("echo hi\n")
    await page.wait_for_function(
        "[...document.querySelectorAll('#terminal .xterm-rows > div')].some((row) => row.textContent.trim() === 'hi')",
        timeout=15000,
    )

    # The log shows what happened so far, then live events; markup in them is text.
    await page.locator("#event-log li[data-kind='terminal.opened']").first.wait_for(timeout=10000)
    assert await page.locator("#event-log li[data-kind='sandbox.created']").count() == 1
    status, note = live_namek.api("POST", f"/api/sandboxes/{sandbox['id']}/events", body={"text": XSS})
    assert status == 201
    shown = page.locator(f"#event-log li[data-seq='{note['seq']}'] .event-text")
    await shown.wait_for(timeout=10000)
    assert await shown.text_content() == XSS
    assert await page.locator("#event-log img[src='x']").count() == 0
    assert await page.evaluate("window.__xss") is None

    # A note typed on the page arrives like any other event.
    await page.fill("#note-form input", "typed on the page")
    await page.click("#note-form button")
    await page.locator("#event-log .event-text", has_text="typed on the page").wait_for(timeout=10000)

    # A screenshot shows as a thumbnail that opens the full image.
    shot = (
        "import io\nfrom PIL import Image\nfrom sandboxes import events\nout = io.BytesIO()\n"
        "Image.new('RGB', (1280, 800), '#2a9d8f').save(out, 'PNG')\n"
        f"print('SEQ', events.record({sandbox['id']}, 'person.note', 'look', screenshot=out.getvalue())['seq'])\n"
    )
    seq = int(live_namek.manage("shell", "-c", shot).stdout.split("SEQ ")[1])
    thumb = page.locator(f"#event-log li[data-seq='{seq}'] .event-thumb")
    await thumb.wait_for(timeout=10000)
    await page.wait_for_function(
        f"document.querySelector(\"#event-log li[data-seq='{seq}'] .event-thumb img\").naturalWidth === 320"
    )
    await thumb.click()
    await page.wait_for_function(
        "document.querySelector('.event-viewer').open"
        " && document.querySelector('.event-viewer img').naturalWidth === 1280"
    )
    await page.click(".event-viewer button")
    assert errors == []
    await page.close()


async def test_the_log_keeps_a_bounded_number_of_rows_and_follows_unless_scrolled_up(
    live_namek: LiveNamek, browser: Browser, sandbox: dict[str, Any]
) -> None:
    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, live_namek.base_url)
    await page.goto(f"{live_namek.base_url}/sandboxes/{sandbox['id']}/")
    rows = page.locator("#event-log li.event")
    await page.locator("#event-log li[data-kind='sandbox.created']").wait_for(timeout=10000)

    # 20 000 events, written by another process: the DOM keeps at most MAX_ROWS rows.
    before = live_namek.api("GET", f"/api/sandboxes/{sandbox['id']}")[1]["last_event_seq"]
    script = (
        "from sandboxes import events\n"
        "for batch in range(20):\n"
        f"    events.record_many({sandbox['id']}, [events.NewEvent('person.note', f'bulk {{batch}}-{{n}}',"
        " actor='bulk') for n in range(1000)])\n"
    )
    live_namek.manage("shell", "-c", script, timeout=120)
    # (The page's terminal may log its attach meanwhile: the newest is read, not computed.)
    newest = live_namek.api("GET", f"/api/sandboxes/{sandbox['id']}")[1]["last_event_seq"]
    assert newest >= before + 20000
    await page.locator(f"#event-log li[data-seq='{newest}']").wait_for(timeout=60000)
    max_rows = await page.evaluate("import('/static/namek/eventlog.js').then((m) => m.MAX_ROWS)")
    assert max_rows == 500
    assert await rows.count() <= max_rows
    first_shown = int(await rows.first.get_attribute("data-seq") or 0)
    assert first_shown == newest - max_rows + 1
    assert "not shown here" in (await page.text_content(".event-dropped") or "")
    # Following live: the newest row is in view.
    at_bottom = "(() => { const l = document.querySelector('.event-list'); return l.scrollTop + l.clientHeight"
    assert await page.evaluate(at_bottom + " >= l.scrollHeight - 24; })()")

    # Scrolled up, the reader stays put and is told about new events below.
    await page.evaluate("document.querySelector('.event-list').scrollTop = 0")
    live_namek.api("POST", f"/api/sandboxes/{sandbox['id']}/events", body={"text": "while reading"})
    await page.locator(".event-more", has_text="1 new event").wait_for(timeout=10000)
    assert await page.evaluate("document.querySelector('.event-list').scrollTop") == 0
    await page.click(".event-more")
    await page.locator(".event-more").wait_for(state="hidden")
    assert await rows.count() <= max_rows
    assert errors == []
    await page.close()


SCREEN_SIGNATURE = """(() => {
    const canvas = document.querySelector('#screen canvas');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let hash = 0;
    for (let i = 0; i < data.length; i += 4 * 997) {
        hash = (hash * 31 + data[i] + data[i + 1] * 7 + data[i + 2] * 13) | 0;
    }
    return hash;
})()"""


async def test_run_demo_from_the_dashboard_shows_steps_while_the_screen_changes(
    live_namek: LiveNamek, browser: Browser
) -> None:
    page = await browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await log_in(page, live_namek.base_url)
    await page.click("#demo-button")
    await page.wait_for_url("**/sandboxes/*/", timeout=60000)
    sandbox_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    try:
        await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'")
        signatures = {await page.evaluate(SCREEN_SIGNATURE)}
        steps = page.locator("#event-log li[data-kind='agent.step']")
        deadline = time.monotonic() + 90
        while await steps.count() < 3 or len(signatures) < 3:
            assert time.monotonic() < deadline, (await steps.count(), len(signatures))
            signatures.add(await page.evaluate(SCREEN_SIGNATURE))
            await asyncio.sleep(0.3)
        assert await steps.first.locator(".event-thumb img").count() == 1, "steps come with their screenshot"
        await page.locator("#event-log li[data-kind='agent.done']").wait_for(timeout=90000)
        assert "done" in (await page.text_content("#agent-state") or "")
        assert errors == []
    finally:
        live_namek.delete_sandbox(sandbox_id)
        await page.close()

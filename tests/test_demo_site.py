"""Northwind Supplies, the demo shop under /demo/: its pages and flows through Django's test
client, bad input, and every step file in demo/ walked in Debian's Chromium against a real
Namek."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from django.test import Client
from django.utils import timezone
from playwright.async_api import Browser, Locator, Page

from tests.live import LiveNamek
from viewer.demo import CATEGORIES, PRODUCTS

ROOT = Path(__file__).resolve().parent.parent
STEP_FILES = sorted((ROOT / "demo").glob("*.yaml"))
REFERENCE = re.compile(r"NW-[A-Z0-9]{6}")
CONTACT = {"full_name": "Ada Lovelace", "email": "ada@example.com", "company": "Analytical Engines Ltd"}
DETAILS = {"product": "desk-lamp", "quantity": "20", "delivery_date": "", "express": "yes", "notes": "Loading dock"}


@pytest.fixture
def client(db: None) -> Client:
    return Client()


@pytest.fixture
def strict(db: None) -> Client:
    """A client whose posts must carry a CSRF token, as a browser's must."""
    return Client(enforce_csrf_checks=True)


def page_text(response: Any) -> str:
    return str(response.content.decode())


def names(response: Any) -> list[str]:
    return [product.name for product in response.context["products"]]


def through_step_2(client: Client, **details: str) -> Any:
    assert client.post("/demo/quote", CONTACT).status_code == 302
    return client.post("/demo/quote/details", {**DETAILS, **details})


# --- pages ---------------------------------------------------------------------------------


PUBLIC_PAGES = [
    "/demo/",
    "/demo/search",
    "/demo/search?q=lamp",
    "/demo/products/desk-lamp",
    "/demo/quote",
    "/demo/login",
]


def test_every_page_answers_without_a_login(client: Client) -> None:
    for url in PUBLIC_PAGES:
        response = client.get(url)
        assert response.status_code == 200, url
        assert "Northwind Supplies" in page_text(response)
        assert response["X-Frame-Options"] == "DENY", "no other site may frame the shop"
    # Pages that need what came before send back to it.
    assert client.get("/demo/account")["Location"] == "/demo/login"
    assert client.get("/demo/quote/details")["Location"] == "/demo/quote"
    assert client.get("/demo/quote/review")["Location"] == "/demo/quote"


def test_no_page_links_out_of_the_shop_or_mentions_namek(client: Client) -> None:
    seen = [client.get(url) for url in PUBLIC_PAGES]
    seen += [client.get("/demo/search?q=zzzz"), through_step_2(client, quantity="0"), client.get("/demo/quote")]
    through_step_2(client)
    seen.append(client.get("/demo/quote/details"))
    seen.append(client.get("/demo/quote/review"))
    seen.append(client.post("/demo/quote/review", {"action": "submit"}, follow=True))
    client.post("/demo/login", {"username": "demo", "password": "northwind"})
    seen.append(client.get("/demo/account"))
    for response in seen:
        assert response.status_code == 200, response.request
        html = page_text(response)
        links = re.findall(r'(?:href|src|action)="([^"]*)"', html)
        assert links
        outside = [link for link in links if not link.startswith(("/demo/", "/static/demo/"))]
        assert outside == [], response.request["PATH_INFO"]
        assert "/api/" not in html and "namek" not in html.lower()


# --- search and the cart -----------------------------------------------------------------


def test_search_filters_and_sorts(client: Client) -> None:
    everything = client.get("/demo/search")
    assert names(everything) == [product.name for product in PRODUCTS] and len(PRODUCTS) == 30

    lamps = client.get("/demo/search", {"q": "lamp", "category": "Lighting", "sort": "price_asc"})
    assert names(lamps) == ["Desk lamp", "Reading lamp", "Floor lamp"]
    html = page_text(lamps)
    assert html.index(">Desk lamp<") < html.index(">Reading lamp<") < html.index(">Floor lamp<")
    assert '<option value="Lighting" selected>' in html and '<option value="price_asc" selected>' in html
    assert names(client.get("/demo/search", {"q": "lamp", "sort": "price_desc"})) == [
        "Floor lamp",
        "Reading lamp",
        "Desk lamp",
    ]

    # Relevance: names starting with the words, then holding them; a category matches too.
    assert names(client.get("/demo/search", {"q": "desk"})) == ["Desk lamp", "Desk organiser", "Standing desk"]
    assert names(client.get("/demo/search", {"q": "  KITCHEN  "})) == ["Coffee mug", "Water bottle", "Electric kettle"]
    assert names(client.get("/demo/search", {"q": "wireless mouse"})) == ["Wireless mouse"]

    stationery = client.get("/demo/search", {"category": "Stationery"}).context["products"]
    assert len(stationery) == 7 and {p.category for p in stationery} == {"Stationery"}
    for sort, descending in (("price_asc", False), ("price_desc", True)):
        prices = [p.price for p in client.get("/demo/search", {"sort": sort}).context["products"]]
        assert prices == sorted(prices, reverse=descending) and len(prices) == 30

    nothing = client.get("/demo/search", {"q": "unicorn", "category": "Kitchen"})
    assert nothing.status_code == 200 and "No products match" in page_text(nothing)


def test_a_product_goes_into_the_cart_and_stock_is_respected(client: Client) -> None:
    page = client.get("/demo/products/desk-lamp")
    assert "Add to cart" in page_text(page) and "$24.90" in page_text(page) and "Cart (0)" in page_text(page)
    added = client.post("/demo/products/desk-lamp")
    assert added.status_code == 302 and added["Location"] == "/demo/products/desk-lamp"
    shown = page_text(client.get("/demo/products/desk-lamp"))
    assert "Added to cart" in shown and "Cart (1)" in shown and "In your cart: 1" in shown
    assert "Added to cart" not in page_text(client.get("/demo/products/desk-lamp")), "the notice shows once"

    sold_out = client.get("/demo/products/monitor-arm")
    assert "Out of stock" in page_text(sold_out) and re.search(
        r"<button[^>]*disabled[^>]*>Add to cart", page_text(sold_out)
    )
    refused = page_text(client.post("/demo/products/monitor-arm", follow=True))
    assert "out of stock" in refused and "Cart (1)" in refused

    for _ in range(5):
        client.post("/demo/products/floor-lamp")
    sixth = page_text(client.post("/demo/products/floor-lamp", follow=True))
    assert "already in your cart" in sixth and "Cart (6)" in sixth
    assert client.get("/demo/products/no-such-thing").status_code == 404


# --- the quote wizard ----------------------------------------------------------------------


def test_step_1_says_what_is_wrong_and_keeps_what_was_typed(client: Client) -> None:
    response = client.post("/demo/quote", {"full_name": "  ", "email": "ada-at-example", "company": "AE"})
    html = page_text(response)
    assert response.status_code == 200
    assert "Please correct the highlighted fields." in html
    assert "Enter your full name." in html and "Enter a valid email address" in html
    assert 'value="ada-at-example"' in html and 'value="AE"' in html
    assert 'aria-invalid="true" aria-describedby="email-error"' in html
    assert "Enter your email address." in page_text(client.post("/demo/quote", {"full_name": "Ada"}))
    assert client.get("/demo/quote/details").status_code == 302, "step 2 waits for a valid step 1"


@pytest.mark.parametrize(
    ("details", "field", "message"),
    [
        ({"quantity": "0"}, "quantity", "Quantity must be at least 1."),
        ({"quantity": "-3"}, "quantity", "Quantity must be at least 1."),
        ({"quantity": ""}, "quantity", "Enter a quantity."),
        ({"quantity": "2.5"}, "quantity", "Enter a whole number."),
        ({"quantity": "1e3"}, "quantity", "Enter a whole number."),
        ({"quantity": "99999999999999999999"}, "quantity", "Quantity must be at most 10000."),
        ({"product": ""}, "product", "Choose a product."),
        ({"product": "../../etc/passwd"}, "product", "Choose a product."),
        ({"delivery_date": "2030-02-30"}, "delivery_date", "Enter a date as YYYY-MM-DD."),
        ({"delivery_date": "tomorrow"}, "delivery_date", "Enter a date as YYYY-MM-DD."),
        ({"delivery_date": "2020-01-01"}, "delivery_date", "Choose a date from today onwards."),
    ],
)
def test_step_2_says_what_is_wrong(client: Client, details: dict[str, str], field: str, message: str) -> None:
    response = through_step_2(client, **details)
    assert response.status_code == 200
    html = page_text(response)
    assert f'<p class="field-error" id="{field}-error">{message}' in html
    assert "Loading dock" in html, "the other values stay"
    assert client.get("/demo/quote/review")["Location"] == "/demo/quote/details"


def test_back_buttons_keep_what_was_entered(client: Client) -> None:
    through_step_2(client, quantity="0", action="back")  # Back saves even what is not valid yet
    step_1 = page_text(client.get("/demo/quote"))
    assert 'value="Ada Lovelace"' in step_1 and 'value="ada@example.com"' in step_1
    assert client.post("/demo/quote", CONTACT)["Location"] == "/demo/quote/details"
    step_2 = page_text(client.get("/demo/quote/details"))
    assert 'value="0"' in step_2 and '<option value="desk-lamp" selected>' in step_2
    assert 'value="yes" checked' in step_2 and ">Loading dock</textarea>" in step_2

    assert client.post("/demo/quote/details", DETAILS)["Location"] == "/demo/quote/review"
    assert client.post("/demo/quote/review", {"action": "back"})["Location"] == "/demo/quote/details"
    assert 'value="20"' in page_text(client.get("/demo/quote/details"))


def test_the_whole_wizard_ends_with_a_reference(client: Client) -> None:
    later = (timezone.localdate() + timedelta(days=10)).isoformat()
    assert client.get("/demo/quote").status_code == 200
    assert client.post("/demo/quote", CONTACT)["Location"] == "/demo/quote/details"
    assert client.post("/demo/quote/details", {**DETAILS, "delivery_date": later})["Location"] == "/demo/quote/review"
    review = page_text(client.get("/demo/quote/review"))
    for shown in ("Ada Lovelace", "ada@example.com", "Analytical Engines Ltd", "Desk lamp", later, "Loading dock"):
        assert shown in review
    assert "<dd>20</dd>" in review and "Yes (+$15.00)" in review and "$513.00" in review  # 20 x 24.90 + 15
    assert "Submit request" in review and "Back" in review

    submitted = client.post("/demo/quote/review", {"action": "submit"})
    assert submitted.status_code == 302
    reference = submitted["Location"].rsplit("/", 1)[1]
    assert REFERENCE.fullmatch(reference) and submitted["Location"] == f"/demo/quote/received/{reference}"
    received = page_text(client.get(submitted["Location"]))
    assert "Quote request received" in received and f'<strong id="reference">{reference}</strong>' in received
    assert client.session["demo_quotes"][-1]["reference"] == reference

    # The draft is gone: a new request starts empty, and the review needs steps 1-2 again.
    assert client.get("/demo/quote/review")["Location"] == "/demo/quote"
    assert 'value="Ada Lovelace"' not in page_text(client.get("/demo/quote"))
    # A second quote gets its own reference; both stay readable in this session only.
    through_step_2(client, quantity="3")
    second = client.post("/demo/quote/review", {"action": "submit"})["Location"]
    assert second != submitted["Location"] and client.get(submitted["Location"]).status_code == 200
    assert Client().get(second).status_code == 404, "another session does not see it"
    assert client.get("/demo/quote/received/NW-AAAAAA").status_code == 404


# --- the demo sign-in --------------------------------------------------------------------


def test_sign_in_wrong_then_right_then_out(client: Client) -> None:
    page = page_text(client.get("/demo/login"))
    assert "Demo account: username <code>demo</code>, password <code>northwind</code>" in page
    wrong = client.post("/demo/login", {"username": "demo", "password": "northwind-typo"})
    assert wrong.status_code == 200 and "Wrong username or password" in page_text(wrong)
    assert 'value="demo"' in page_text(wrong), "the username stays"
    assert "northwind-typo" not in page_text(wrong), "the password is never sent back"
    assert "Wrong username or password" in page_text(
        client.post("/demo/login", {"username": "Demo", "password": "northwind"})
    )
    assert "Wrong username or password" in page_text(client.post("/demo/login", {"username": "admin"}))
    assert client.get("/demo/account")["Location"] == "/demo/login"

    key = client.session.session_key
    right = client.post("/demo/login", {"username": "demo", "password": "northwind"})
    assert right.status_code == 302 and right["Location"] == "/demo/account"
    assert client.session.session_key != key, "signing in gets a new session key"
    account = page_text(client.get("/demo/account"))
    assert "Welcome, Demo User" in account and ">Sign out</button>" in account and "My account" in account
    assert client.get("/demo/login")["Location"] == "/demo/account"
    assert client.get("/")["Location"].startswith("/login/"), "the demo sign-in is not a Namek login"

    out = client.post("/demo/logout", follow=True)
    assert out.redirect_chain == [("/demo/login", 302)] and "You are signed out." in page_text(out)
    assert client.get("/demo/account")["Location"] == "/demo/login"


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        {"q": "x" * 100_000},
        {"q": "lamp" * 30},
        {"category": "Weapons", "sort": "'; DROP TABLE products; --"},
        {"category": "lighting"},  # categories are exact
        {"sort": "price"},
        {"q": "\x00\x01", "category": "", "sort": ""},
        {"q": "<script>alert(1)</script>"},
        {"q": ["lamp", "desk"], "category": ["Lighting", "Kitchen"]},
    ],
)
def test_absurd_searches_fall_back_to_defaults(client: Client, query: dict[str, Any]) -> None:
    response = client.get("/demo/search", query)
    assert response.status_code == 200
    assert len(response.context["query"]) <= 100
    assert response.context["category"] in ["", *CATEGORIES] and response.context["sort"] in (
        "relevance",
        "price_asc",
        "price_desc",
    )
    assert "<script>alert" not in page_text(response)


def test_unknown_category_and_sort_mean_all_and_relevance(client: Client) -> None:
    response = client.get("/demo/search", {"category": "Weapons", "sort": "cheapest"})
    assert response.context["category"] == "" and response.context["sort"] == "relevance"
    assert names(response) == [product.name for product in PRODUCTS]
    assert "No products match" in page_text(client.get("/demo/search", {"q": "x" * 100_000}))


def test_posts_without_a_csrf_token_are_refused(strict: Client) -> None:
    for url in ("/demo/products/desk-lamp", "/demo/quote", "/demo/quote/details", "/demo/quote/review"):
        assert strict.post(url, {**CONTACT, **DETAILS}).status_code == 403, url
    assert strict.post("/demo/login", {"username": "demo", "password": "northwind"}).status_code == 403
    assert strict.post("/demo/logout").status_code == 403
    assert "demo_user" not in strict.session and "demo_cart" not in strict.session

    # With the token from the page, the same post goes through.
    page = strict.get("/demo/login")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page_text(page))
    assert token
    signed_in = strict.post(
        "/demo/login", {"username": "demo", "password": "northwind", "csrfmiddlewaretoken": token[1]}
    )
    assert signed_in["Location"] == "/demo/account"


def test_later_steps_without_the_earlier_ones_go_back(client: Client) -> None:
    assert client.get("/demo/quote/review")["Location"] == "/demo/quote"
    assert client.post("/demo/quote/review", {"action": "submit"})["Location"] == "/demo/quote"
    assert client.post("/demo/quote/details", DETAILS)["Location"] == "/demo/quote"
    assert "demo_quotes" not in client.session
    client.post("/demo/quote", CONTACT)
    assert client.get("/demo/quote/review")["Location"] == "/demo/quote/details"
    assert client.post("/demo/quote/review", {"action": "submit"})["Location"] == "/demo/quote/details"


def test_other_abuse_is_answered_plainly(client: Client) -> None:
    assert client.put("/demo/search").status_code == 405
    assert client.delete("/demo/quote").status_code == 405
    assert client.get("/demo/logout").status_code == 405
    assert client.get("/demo/products/<script>").status_code == 404
    assert client.head("/demo/search").status_code == 200
    # Overlong fields are cut to their limits, not refused with a 500.
    long = client.post("/demo/quote", {**CONTACT, "full_name": "A" * 50_000, "company": "C" * 50_000})
    assert long.status_code == 302 and len(client.session["demo_quote"]["contact"]["full_name"]) == 100
    notes = client.post("/demo/quote/details", {**DETAILS, "notes": "N" * 50_000})
    assert notes.status_code == 302 and len(client.session["demo_quote"]["details"]["notes"]) == 1000
    # Markup typed into the form is shown as text.
    client.post("/demo/quote", {**CONTACT, "full_name": "<b>Ada</b>"})
    assert "&lt;b&gt;Ada&lt;/b&gt;" in page_text(client.get("/demo/quote/review"))


# --- the step files ------------------------------------------------------------------------

ACTIONS = {
    "navigate": None,
    "type": {"target", "text"},
    "click": {"target"},
    "select": {"target", "option"},
    "scroll": {"direction", "pages"},
    "wait": {"seconds"},
    "done": {"text", "success"},
}
#: Where each flow ends: (path prefix, text shown there).
ENDS = {
    "search.yaml": ("/demo/products/desk-lamp", "Added to cart"),
    "quote.yaml": ("/demo/quote/received/", "Quote request received"),
    "login.yaml": ("/demo/account", "Welcome, Demo User"),
}


def load(step_file: Path) -> dict[str, Any]:
    with step_file.open() as handle:
        return dict(yaml.safe_load(handle))


def action_of(step: dict[str, Any]) -> str:
    (action,) = set(step) - {"goal", "thought"}
    return str(action)


def test_the_step_files_follow_the_format() -> None:
    assert {path.name for path in STEP_FILES} == set(ENDS)
    for step_file in STEP_FILES:
        flow = load(step_file)
        assert set(flow) == {"name", "task", "steps"} and flow["name"] and flow["task"], step_file.name
        for step in flow["steps"]:
            action = action_of(step)
            assert action in ACTIONS, step
            if ACTIONS[action] is None:
                assert isinstance(step[action], str) and step[action].startswith(("/demo/", "http")), step
            else:
                assert set(step[action]) <= ACTIONS[action], step
            target = step[action].get("target") if isinstance(step[action], dict) else None
            if target is not None:
                assert set(target) in ({"label"}, {"text"}, {"css"}, {"role", "name"}), step
        assert action_of(flow["steps"][-1]) == "done" and flow["steps"][-1]["done"]["success"] is True
        assert [action_of(step) for step in flow["steps"]].count("done") == 1


def locators(page: Page, target: dict[str, str]) -> list[Locator]:
    """The target with substring and with exact matching: both must find the same one element."""
    if "label" in target:
        return [page.get_by_label(target["label"], exact=exact) for exact in (False, True)]
    if "text" in target:
        return [page.get_by_text(target["text"], exact=exact) for exact in (False, True)]
    if "role" in target:
        return [page.get_by_role(target["role"], name=target["name"], exact=exact) for exact in (False, True)]  # type: ignore[arg-type]
    return [page.locator(target["css"])]


async def the_one(page: Page, target: dict[str, str], where: str) -> Locator:
    found = [locator.filter(visible=True) for locator in locators(page, target)]
    await found[-1].first.wait_for(timeout=10000)
    for locator in found:
        count = await locator.count()
        assert count == 1, f"{where}: {target} matches {count} visible elements"
    same = await found[0].evaluate("(e, other) => e === other", await found[-1].element_handle())
    assert same, f"{where}: {target} finds different elements with exact and substring matching"
    return found[-1]


async def walk(page: Page, base_url: str, steps: list[dict[str, Any]], name: str) -> None:
    for number, step in enumerate(steps, 1):
        action = action_of(step)
        args = step[action]
        where = f"{name} step {number} ({action})"
        if action == "navigate":
            await page.goto(args if args.startswith(("http://", "https://")) else base_url + args)
        elif action == "type":
            await (await the_one(page, args["target"], where)).fill(str(args["text"]))
        elif action == "click":
            await (await the_one(page, args["target"], where)).click()
            await page.wait_for_load_state()
        elif action == "select":
            element = await the_one(page, args["target"], where)
            await element.select_option(str(args["option"]))
            chosen = await element.evaluate("e => e.options[e.selectedIndex].label")
            assert chosen == args["option"], where
        elif action == "scroll":
            sign = -1 if args["direction"] == "up" else 1
            assert args["direction"] in ("up", "down"), where
            await page.evaluate("dy => window.scrollBy(0, dy * window.innerHeight)", sign * float(args.get("pages", 1)))
        elif action == "wait":
            await asyncio.sleep(min(float(args["seconds"]), 5))
        elif action == "done":
            assert args["success"] is True, where


@pytest.mark.browser
@pytest.mark.processes
@pytest.mark.parametrize("step_file", STEP_FILES, ids=[path.name for path in STEP_FILES])
async def test_each_step_file_walks_to_its_end_in_chromium(
    live_namek: LiveNamek, browser: Browser, step_file: Path
) -> None:
    flow = load(step_file)
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    problems: list[str] = []
    loaded: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.on(
        "response",
        lambda response: (problems if response.status >= 400 else loaded).append(f"{response.status} {response.url}"),
    )
    await walk(page, live_namek.base_url, flow["steps"], step_file.name)

    path, text = ENDS[step_file.name]
    assert urlsplit(page.url).path.startswith(path), page.url
    assert await page.get_by_text(text, exact=True).filter(visible=True).count() == 1
    if step_file.name == "quote.yaml":
        assert REFERENCE.fullmatch(await page.locator("#reference").text_content() or "")
    assert f"200 {live_namek.base_url}/static/demo/demo.css" in loaded, "the stylesheet is served"
    assert problems == []
    await context.close()

"""Northwind Supplies: a small, fictional shop that sandboxes' browsers can reach offline.

Served under /demo/ without a Namek login (a sandbox's browser has none), for demos and for
agents, scripted (the step files in demo/) or not. Three flows: search the catalogue and
add to the cart, a three-step quote request, a sign-in. Everything a visitor does is kept in
their Django session under ``demo_*`` keys: no models, and nothing of Namek is read or shown.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST, require_safe

app_name = "demo"

# --- the catalogue --------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    slug: str
    name: str
    category: str
    price: Decimal
    stock: int

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.category]


CATEGORIES = ["Lighting", "Furniture", "Stationery", "Storage", "Electronics", "Kitchen"]
DESCRIPTIONS = {
    "Lighting": "Energy-efficient lighting for the office and the home office. Two-year warranty.",
    "Furniture": "Sturdy office furniture, delivered flat-packed with tools and instructions.",
    "Stationery": "Everyday stationery for busy desks. Sold by the pack.",
    "Storage": "Keep papers and supplies in order. Stackable where it makes sense.",
    "Electronics": "Reliable peripherals that work out of the box with any computer.",
    "Kitchen": "For the office kitchen: dishwasher-safe and built to last.",
}
_CATALOGUE = [
    ("desk-lamp", "Desk lamp", "Lighting", "24.90", 42),
    ("reading-lamp", "Reading lamp", "Lighting", "34.50", 12),
    ("floor-lamp", "Floor lamp", "Lighting", "89.00", 5),
    ("led-strip-light", "LED strip light", "Lighting", "19.99", 0),
    ("led-bulb-4-pack", "LED bulb 4-pack", "Lighting", "12.50", 120),
    ("office-chair", "Office chair", "Furniture", "149.00", 8),
    ("standing-desk", "Standing desk", "Furniture", "399.00", 3),
    ("bookshelf", "Bookshelf", "Furniture", "79.00", 11),
    ("filing-cabinet", "Filing cabinet", "Furniture", "129.00", 6),
    ("footrest", "Footrest", "Furniture", "29.90", 25),
    ("ballpoint-pen-set", "Ballpoint pen set", "Stationery", "6.90", 300),
    ("spiral-notebook", "Spiral notebook", "Stationery", "3.50", 500),
    ("sticky-notes", "Sticky notes", "Stationery", "4.20", 250),
    ("stapler", "Stapler", "Stationery", "11.90", 60),
    ("paper-clips", "Paper clips", "Stationery", "2.10", 800),
    ("highlighter-set", "Highlighter set", "Stationery", "5.60", 140),
    ("printer-paper", "Printer paper", "Stationery", "8.99", 200),
    ("archive-box", "Archive box", "Storage", "4.90", 150),
    ("desk-organiser", "Desk organiser", "Storage", "17.50", 34),
    ("magazine-file", "Magazine file", "Storage", "6.40", 90),
    ("storage-crate", "Storage crate", "Storage", "14.90", 0),
    ("wireless-mouse", "Wireless mouse", "Electronics", "22.00", 55),
    ("wireless-keyboard", "Wireless keyboard", "Electronics", "39.00", 31),
    ("usb-c-hub", "USB-C hub", "Electronics", "45.00", 18),
    ("webcam", "Webcam", "Electronics", "59.00", 9),
    ("monitor-arm", "Monitor arm", "Electronics", "69.00", 0),
    ("headset", "Headset", "Electronics", "49.00", 14),
    ("coffee-mug", "Coffee mug", "Kitchen", "7.50", 72),
    ("water-bottle", "Water bottle", "Kitchen", "12.00", 40),
    ("electric-kettle", "Electric kettle", "Kitchen", "34.00", 7),
]
PRODUCTS = [Product(slug, name, category, Decimal(price), stock) for slug, name, category, price, stock in _CATALOGUE]
BY_SLUG = {product.slug: product for product in PRODUCTS}

SORTS = {"relevance": "Relevance", "price_asc": "Price: low to high", "price_desc": "Price: high to low"}
MAX_QUERY = 100
EXPRESS_FEE = Decimal("15.00")


def search_products(query: str, category: str, sort: str) -> list[Product]:
    """Products whose name or category holds every word of ``query``, best first.

    Relevance: the name equal to the query, then starting with it, then holding it, then
    holding its words, then a category match; catalogue order within each.
    """
    words = query.lower().split()
    phrase = " ".join(words)
    found: list[tuple[int, int, Product]] = []
    for index, product in enumerate(PRODUCTS):
        if category and product.category != category:
            continue
        name, haystack = product.name.lower(), f"{product.name} {product.category}".lower()
        if not all(word in haystack for word in words):
            continue
        if not phrase or name == phrase:
            rank = 0
        elif name.startswith(phrase):
            rank = 1
        elif phrase in name:
            rank = 2
        elif all(word in name for word in words):
            rank = 3
        else:
            rank = 4
        found.append((rank, index, product))
    found.sort(key=lambda item: item[:2])
    products = [product for _, _, product in found]
    if sort == "price_asc":
        products.sort(key=lambda product: product.price)
    elif sort == "price_desc":
        products.sort(key=lambda product: product.price, reverse=True)
    return products


# --- shared pieces -----------------------------------------------------------------------

DEMO_USER = "demo"
DEMO_PASSWORD = "northwind"
DEMO_DISPLAY_NAME = "Demo User"


def _flash(request: HttpRequest, text: str, kind: str = "success") -> None:
    request.session["demo_flash"] = {"text": text, "kind": kind}


def _page(request: HttpRequest, template: str, context: dict[str, Any], status: int = 200) -> HttpResponse:
    cart = request.session.get("demo_cart") or {}
    base = {
        "signed_in": request.session.get("demo_user") == DEMO_USER,
        "cart_count": sum(cart.values()) if isinstance(cart, dict) else 0,
        "flash": request.session.pop("demo_flash", None),
    }
    return render(request, template, {**base, **context}, status=status)


def _text(data: Any, name: str, limit: int) -> str:
    """A submitted text field, stripped; overlong values are cut (the inputs say maxlength)."""
    value = data.get(name, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


# --- home, search, products ---------------------------------------------------------------


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return _page(request, "demo/home.html", {"nav": "home"})


@require_safe
def search(request: HttpRequest) -> HttpResponse:
    """The catalogue. Unknown categories and sorts mean "all" and "relevance"."""
    query = " ".join(request.GET.get("q", "")[:MAX_QUERY].split())
    category = request.GET.get("category", "")
    if category not in CATEGORIES:
        category = ""
    sort = request.GET.get("sort", "")
    if sort not in SORTS:
        sort = "relevance"
    products = search_products(query, category, sort)
    context = {
        "nav": "products",
        "query": query,
        "category": category,
        "sort": sort,
        "categories": CATEGORIES,
        "sorts": SORTS.items(),
        "products": products,
        "filtered": bool(query or category),
    }
    return _page(request, "demo/search.html", context)


@require_http_methods(["GET", "HEAD", "POST"])
def product(request: HttpRequest, slug: str) -> HttpResponse:
    item = BY_SLUG.get(slug)
    if item is None:
        raise Http404("no such product")
    if request.method == "POST":
        cart = request.session.get("demo_cart")
        cart = dict(cart) if isinstance(cart, dict) else {}
        held = int(cart.get(slug, 0))
        if item.stock == 0:
            _flash(request, f"Sorry, {item.name} is out of stock.", "error")
        elif held >= item.stock:
            _flash(request, f"Sorry, all {item.stock} in stock are already in your cart.", "error")
        else:
            cart[slug] = held + 1
            request.session["demo_cart"] = cart
            _flash(request, "Added to cart")
        return redirect("demo:product", slug=slug)
    cart = request.session.get("demo_cart") or {}
    in_cart = cart.get(slug, 0) if isinstance(cart, dict) else 0
    return _page(request, "demo/product.html", {"nav": "products", "product": item, "in_cart": in_cart})


# --- the quote wizard ---------------------------------------------------------------------

CONTACT_FIELDS = ("full_name", "email", "company")
DETAIL_FIELDS = ("product", "quantity", "delivery_date", "express", "notes")
MAX_QUANTITY = 10000
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_WHOLE_NUMBER = re.compile(r"[+-]?\d+", re.ASCII)
_REFERENCE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def read_contact(data: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(values, errors) of step 1."""
    values = {
        "full_name": _text(data, "full_name", 100),
        "email": _text(data, "email", 254),
        "company": _text(data, "company", 100),
    }
    errors = {}
    if not values["full_name"]:
        errors["full_name"] = "Enter your full name."
    if not values["email"]:
        errors["email"] = "Enter your email address."
    else:
        try:
            validate_email(values["email"])
        except ValidationError:
            errors["email"] = "Enter a valid email address, like name@example.com."
    return values, errors


def read_details(data: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(values, errors) of step 2."""
    values = {
        "product": _text(data, "product", 100),
        "quantity": _text(data, "quantity", 20),
        "delivery_date": _text(data, "delivery_date", 20),
        "express": "yes" if data.get("express") else "",
        "notes": _text(data, "notes", 1000),
    }
    errors = {}
    if values["product"] not in BY_SLUG:
        errors["product"] = "Choose a product."
    if not values["quantity"]:
        errors["quantity"] = "Enter a quantity."
    elif not _WHOLE_NUMBER.fullmatch(values["quantity"]):
        errors["quantity"] = "Enter a whole number."
    elif int(values["quantity"]) < 1:
        errors["quantity"] = "Quantity must be at least 1."
    elif int(values["quantity"]) > MAX_QUANTITY:
        errors["quantity"] = f"Quantity must be at most {MAX_QUANTITY}. For more, call us."
    if values["delivery_date"]:
        try:
            if not _ISO_DATE.fullmatch(values["delivery_date"]):
                raise ValueError
            wanted = date.fromisoformat(values["delivery_date"])
        except ValueError:
            errors["delivery_date"] = "Enter a date as YYYY-MM-DD."
        else:
            if wanted < timezone.localdate():
                errors["delivery_date"] = "Choose a date from today onwards."
    return values, errors


def _draft(request: HttpRequest) -> dict[str, Any]:
    draft = request.session.get("demo_quote")
    return dict(draft) if isinstance(draft, dict) else {}


def _save_draft(request: HttpRequest, draft: dict[str, Any]) -> None:
    request.session["demo_quote"] = draft


def _contact_ok(draft: dict[str, Any]) -> bool:
    return not read_contact(draft.get("contact") or {})[1]


def _details_ok(draft: dict[str, Any]) -> bool:
    return not read_details(draft.get("details") or {})[1]


def _wizard(request: HttpRequest, template: str, step: int, context: dict[str, Any], status: int = 200) -> HttpResponse:
    steps = [(1, "Contact"), (2, "Details"), (3, "Review")]
    return _page(request, template, {"nav": "quote", "steps": steps, "step": step, **context}, status)


@require_http_methods(["GET", "HEAD", "POST"])
def quote_contact(request: HttpRequest) -> HttpResponse:
    draft = _draft(request)
    if request.method == "POST":
        values, errors = read_contact(request.POST)
        draft["contact"] = values
        _save_draft(request, draft)
        if not errors:
            return redirect("demo:quote-details")
    else:
        values, errors = draft.get("contact") or dict.fromkeys(CONTACT_FIELDS, ""), {}
    return _wizard(request, "demo/quote_contact.html", 1, {"values": values, "errors": errors})


@require_http_methods(["GET", "HEAD", "POST"])
def quote_details(request: HttpRequest) -> HttpResponse:
    draft = _draft(request)
    if not _contact_ok(draft):
        return redirect("demo:quote")
    if request.method == "POST":
        values, errors = read_details(request.POST)
        draft["details"] = values
        _save_draft(request, draft)
        if request.POST.get("action") == "back":
            return redirect("demo:quote")
        if not errors:
            return redirect("demo:quote-review")
    else:
        values, errors = draft.get("details") or dict.fromkeys(DETAIL_FIELDS, ""), {}
    context = {"values": values, "errors": errors, "products": PRODUCTS}
    return _wizard(request, "demo/quote_details.html", 2, context)


def _summary(contact: dict[str, str], details: dict[str, str]) -> dict[str, Any]:
    item = BY_SLUG[details["product"]]
    quantity = int(details["quantity"])
    express = bool(details["express"])
    total = item.price * quantity + (EXPRESS_FEE if express else Decimal(0))
    return {
        **contact,
        **details,
        "product_name": item.name,
        "unit_price": str(item.price),
        "quantity": quantity,
        "express": express,
        "total": str(total),
    }


@require_http_methods(["GET", "HEAD", "POST"])
def quote_review(request: HttpRequest) -> HttpResponse:
    draft = _draft(request)
    if not _contact_ok(draft):
        return redirect("demo:quote")
    if not _details_ok(draft):
        return redirect("demo:quote-details")
    if request.method == "POST":
        if request.POST.get("action") == "back":
            return redirect("demo:quote-details")
        quote = _summary(draft["contact"], draft["details"])
        quote["reference"] = "NW-" + "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(6))
        quote["submitted_at"] = timezone.now().isoformat(timespec="seconds")
        quotes = request.session.get("demo_quotes")
        quotes = list(quotes) if isinstance(quotes, list) else []
        request.session["demo_quotes"] = [*quotes, quote][-20:]
        request.session.pop("demo_quote", None)
        return redirect("demo:quote-received", reference=quote["reference"])
    summary = _summary(draft["contact"], draft["details"])
    return _wizard(request, "demo/quote_review.html", 3, {"quote": summary, "express_fee": EXPRESS_FEE})


@require_safe
def quote_received(request: HttpRequest, reference: str) -> HttpResponse:
    quotes = request.session.get("demo_quotes")
    found = next((q for q in quotes or [] if isinstance(q, dict) and q.get("reference") == reference), None)
    if found is None:
        raise Http404("no such quote in this session")
    return _page(request, "demo/quote_received.html", {"nav": "quote", "quote": found})


# --- sign-in (a flag in the session, not Django's auth) -----------------------------------


@require_http_methods(["GET", "HEAD", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    if request.session.get("demo_user") == DEMO_USER:
        return redirect("demo:account")
    username, error = "", ""
    if request.method == "POST":
        username = _text(request.POST, "username", 150)
        password = request.POST.get("password", "")
        password = password if isinstance(password, str) else ""
        right_user = hmac.compare_digest(username.encode(), DEMO_USER.encode())
        right_password = hmac.compare_digest(password.encode(), DEMO_PASSWORD.encode())
        if right_user and right_password:
            request.session.cycle_key()
            request.session["demo_user"] = DEMO_USER
            return redirect("demo:account")
        error = "Wrong username or password"
    return _page(request, "demo/login.html", {"nav": "account", "username": username, "error": error})


@require_safe
def account(request: HttpRequest) -> HttpResponse:
    if request.session.get("demo_user") != DEMO_USER:
        return redirect("demo:login")
    quotes = request.session.get("demo_quotes")
    context = {
        "nav": "account",
        "display_name": DEMO_DISPLAY_NAME,
        "quotes": [q for q in quotes if isinstance(q, dict)] if isinstance(quotes, list) else [],
    }
    return _page(request, "demo/account.html", context)


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    request.session.pop("demo_user", None)
    _flash(request, "You are signed out.")
    return redirect("demo:login")


urlpatterns = [
    path("", home, name="home"),
    path("search", search, name="search"),
    path("products/<slug:slug>", product, name="product"),
    path("quote", quote_contact, name="quote"),
    path("quote/details", quote_details, name="quote-details"),
    path("quote/review", quote_review, name="quote-review"),
    path("quote/received/<str:reference>", quote_received, name="quote-received"),
    path("login", login, name="login"),
    path("account", account, name="account"),
    path("logout", logout, name="logout"),
]

"""Read-only share links (``sandboxes.sharing``): tokens, the API, the shared page, the
websockets through Channels' WebsocketCommunicator, and a live Namek where a link
holder's input must never reach the sandbox.

Bad input tried:

- tokens: one character changed (at the start, in the middle, at the end), another
  link's signature on this link's id, this link's id signed with another salt (the
  sandbox start page's) and with another key, a signed string instead of an id, an
  empty, blank, huge or non-ASCII token, a token of an expired, a revoked, a
  deleted link and of a deactivated creator;
- ``POST /api/share-links``: unknown fields, a body that is not an object, malformed
  JSON, ``sandbox`` as a string, a float, a boolean, 0, negative, past the largest id,
  null; ``wall`` as a string, a number, null; both ``sandbox`` and ``wall``, neither,
  ``wall: false`` alone; ``expires_in`` below a minute, over 30 days, as a string, a
  float, a boolean, null; a sandbox that does not exist, one of someone else, one a
  viewer may only watch, the wall by a user who is not an operator; more active links
  than a user may have;
- ``GET /api/share-links``: a ``sandbox`` that is not a number; someone else's link read
  and revoked by id;
- a share token as a bearer token on the API (reads and writes) and as a ``share``
  query parameter of the API;
- pages: a sandbox link on another sandbox's page and on a sandbox that does not exist;
- websockets: no Origin, a foreign Origin, another sandbox, the dashboard feed, the CDP
  relay and the agent bridge with a valid link; on a live Namek, raw RFB KeyEvents,
  PointerEvents and ClientCutText and terminal keystrokes from a link holder, with nobody
  driving and while the owner drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core import signing
from django.test import Client
from django.utils import timezone
from playwright.async_api import Browser
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from namek_web.asgi import application
from sandboxes import services, sharing
from sandboxes.models import Event, Sandbox, ShareLink
from tests.live import LiveNamek, ready_sandbox
from tests.test_control_live import PROBE, page_devtools, probe_state, screen, send_input, wait_value
from tests.test_screen_relay import RelayClient
from tests.test_terminal import Viewer
from viewer.closecodes import Close

ORIGIN = "http://127.0.0.1:8000"


def user(cast: dict, who: str) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get(pk=cast["ids"][who])


def bearer(cast: dict, who: str = "owner") -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens'][who]}"}


def changed(token: str, at: int) -> str:
    """The token with one character replaced by another of the same alphabet."""
    at %= len(token)
    replacement = "B" if token[at] != "B" else "C"
    return token[:at] + replacement + token[at + 1 :]


def expire(link: ShareLink) -> None:
    ShareLink.objects.filter(pk=link.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


# --- tokens ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_token_resolves_to_its_grant_which_allows_its_sandbox_only(cast: dict, make_sandbox) -> None:
    box, other = make_sandbox(), make_sandbox()
    link, token = sharing.issue(user(cast, "owner"), sandbox=box, expires_in=3600)
    grant = sharing.resolve(token)
    assert grant == sharing.Grant(link_id=link.pk, sandbox_id=box.pk, wall=False)
    assert sharing.allows(grant, box.pk) and not sharing.allows(grant, other.pk)
    assert not sharing.allows(None, box.pk)
    assert 3590 <= (link.expires_at - timezone.now()).total_seconds() <= 3600
    with pytest.raises(AttributeError):
        grant.sandbox_id = other.pk  # type: ignore[misc,union-attr]  # frozen
    assert sharing.token_for(link) == token, "a link's URL can be shown again"


@pytest.mark.django_db
def test_a_wall_grant_allows_every_live_sandbox_and_nothing_else(cast: dict, make_sandbox) -> None:
    ready, starting = make_sandbox(phase="ready"), make_sandbox(owner="outsider", phase="starting")
    stopped, failed = make_sandbox(phase="stopped"), make_sandbox(phase="failed")
    _link, token = sharing.issue(user(cast, "operator"), wall=True)
    grant = sharing.resolve(token)
    assert grant is not None and grant.wall and grant.sandbox_id is None
    assert sharing.allows(grant, ready.pk) and sharing.allows(grant, starting.pk)
    assert not sharing.allows(grant, stopped.pk) and not sharing.allows(grant, failed.pk)
    assert not sharing.allows(grant, 999999)


@pytest.mark.django_db
def test_tampered_tokens_resolve_to_nothing(cast: dict, make_sandbox, settings: Any) -> None:
    box = make_sandbox()
    owner = user(cast, "owner")
    link, token = sharing.issue(owner, sandbox=box)
    _other, other_token = sharing.issue(owner, sandbox=box)
    payload, signature = token.rsplit(":", 1)
    other_payload, other_signature = other_token.rsplit(":", 1)
    assert payload != other_payload
    bad = [
        changed(token, 0),
        changed(token, len(token) // 2),
        changed(token, -1),
        f"{payload}:{other_signature}",  # another link's signature on this id
        f"{other_payload}:{signature}",
        signing.dumps(link.pk, salt=services.START_PAGE_SALT),  # Namek's, over the id, another salt
        services.start_page_token(box.pk),
        signing.Signer(key="another key of at least fifty characters, not Namek's", salt=sharing.SALT).sign_object(
            link.pk
        ),
        signing.Signer(salt=sharing.SALT).sign_object(str(link.pk)),  # the id as a string
        signing.Signer(salt=sharing.SALT).sign_object(True),
        signing.Signer(salt=sharing.SALT).sign_object(999999),  # a link that does not exist
        "",
        "   ",
        token + "x" * 500,
        "ünïcödé:sig",
        payload,
        None,
        link.pk,
    ]
    for value in bad:
        assert sharing.resolve(value) is None, value
    assert sharing.resolve(token) is not None and sharing.resolve(other_token) is not None


@pytest.mark.django_db
def test_expired_revoked_and_orphaned_links_resolve_to_nothing(cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    owner, operator = user(cast, "owner"), user(cast, "operator")
    expired, expired_token = sharing.issue(owner, sandbox=box)
    expire(expired)
    revoked, revoked_token = sharing.issue(owner, sandbox=box)
    sharing.revoke(revoked, by="owner")
    _link, operators_token = sharing.issue(operator, sandbox=box)
    operator.is_active = False
    operator.save()
    deleted, deleted_token = sharing.issue(owner, sandbox=box)
    deleted.delete()
    for token in (expired_token, revoked_token, operators_token, deleted_token):
        assert sharing.resolve(token) is None
    revoked.refresh_from_db()
    assert revoked.revoked_by == "owner" and revoked.revoked_at is not None


@pytest.mark.django_db
def test_a_use_is_counted_and_a_sandbox_links_use_is_in_its_log(cast: dict, make_sandbox) -> None:
    box, elsewhere = make_sandbox(), make_sandbox()
    link, token = sharing.issue(user(cast, "owner"), sandbox=box)
    sharing.record_use(sharing.resolve(token), "page")  # type: ignore[arg-type]
    link.refresh_from_db()
    assert link.uses == 1 and link.last_used_at is not None
    event = Event.objects.get(sandbox=box, kind="share.opened")
    assert (event.source, event.actor) == ("system", f"share link #{link.pk}")
    assert event.data == {"link": link.pk, "where": "page", "wall": False}
    assert f"#{link.pk}" in event.text
    # A wall link's uses are counted on the link only.
    wall, wall_token = sharing.issue(user(cast, "staff"), wall=True)
    sharing.record_use(sharing.resolve(wall_token), "wall")  # type: ignore[arg-type]
    wall.refresh_from_db()
    assert wall.uses == 1
    assert not Event.objects.filter(sandbox=elsewhere, kind="share.opened").exists()
    assert Event.objects.filter(kind="share.opened").count() == 1


# --- the API --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_list_and_revoke_a_link(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    response = client.post(
        "/api/share-links", {"sandbox": box.pk, "expires_in": 3600}, content_type="application/json", **bearer(cast)
    )
    assert response.status_code == 201, response.content
    link = response.json()
    assert set(link) >= {"id", "url", "expires_at"}
    assert link["url"].startswith(f"http://testserver/sandboxes/{box.pk}/?share=")
    token = link["url"].split("?share=", 1)[1]
    assert sharing.resolve(token) == sharing.Grant(link["id"], box.pk, False)
    assert (link["sandbox"], link["wall"], link["created_by"], link["active"], link["uses"]) == (
        box.pk,
        False,
        "owner",
        True,
        0,
    )
    seconds = (timezone.datetime.fromisoformat(link["expires_at"]) - timezone.now()).total_seconds()
    assert 3590 <= seconds <= 3600
    default = client.post("/api/share-links", {"sandbox": box.pk}, content_type="application/json", **bearer(cast))
    expires = timezone.datetime.fromisoformat(default.json()["expires_at"])
    assert 24 * 3600 - 10 <= (expires - timezone.now()).total_seconds() <= 24 * 3600

    listed = client.get(f"/api/share-links?sandbox={box.pk}", **bearer(cast)).json()["share_links"]
    assert [entry["id"] for entry in listed] == [default.json()["id"], link["id"]]
    assert listed[1] == link

    revoked = client.delete(f"/api/share-links/{link['id']}", **bearer(cast))
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None and revoked.json()["active"] is False
    assert sharing.resolve(token) is None
    assert [e["id"] for e in client.get("/api/share-links", **bearer(cast)).json()["share_links"]] == [
        default.json()["id"]
    ]
    everything = client.get("/api/share-links?all=1", **bearer(cast)).json()["share_links"]
    assert [e["id"] for e in everything] == [default.json()["id"], link["id"]]
    again = client.delete(f"/api/share-links/{link['id']}", **bearer(cast))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert client.get(f"/api/share-links/{link['id']}", **bearer(cast)).json() == again.json()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sandbox": "{box}", "colour": "red"}, "unknown fields: colour"),
        ([1, 2], "expected a JSON object"),
        ("{not json", "malformed JSON"),
        ({"sandbox": "7"}, "sandbox:"),
        ({"sandbox": 1.5}, "sandbox:"),
        ({"sandbox": True}, "sandbox:"),
        ({"sandbox": 0}, "sandbox:"),
        ({"sandbox": -3}, "sandbox:"),
        ({"sandbox": 2**63}, "sandbox:"),
        ({"sandbox": None}, "give sandbox"),
        ({"wall": "yes"}, "wall:"),
        ({"wall": 1}, "wall:"),
        ({"wall": None}, "wall:"),
        ({"sandbox": "{box}", "wall": True}, "not both"),
        ({}, "give sandbox"),
        ({"wall": False}, "give sandbox"),
        ({"sandbox": "{box}", "expires_in": 59}, "expires_in:"),
        ({"sandbox": "{box}", "expires_in": 30 * 24 * 3600 + 1}, "expires_in:"),
        ({"sandbox": "{box}", "expires_in": "3600"}, "expires_in:"),
        ({"sandbox": "{box}", "expires_in": 3600.0}, "expires_in:"),
        ({"sandbox": "{box}", "expires_in": True}, "expires_in:"),
        ({"sandbox": "{box}", "expires_in": None}, "expires_in:"),
    ],
)
def test_bad_requests_answer_400_and_create_nothing(
    client: Client, cast: dict, make_sandbox, body: Any, message: str
) -> None:
    box = make_sandbox()
    text = body if isinstance(body, str) else json.dumps(body).replace('"{box}"', str(box.pk))
    response = client.post("/api/share-links", text, content_type="application/json", **bearer(cast, "staff"))
    assert response.status_code == 400, response.content
    assert message in response.json()["error"], response.json()
    assert not ShareLink.objects.exists()


@pytest.mark.django_db
def test_who_may_share_what(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox(owner="owner")

    def create(who: str, body: dict) -> int:
        return client.post("/api/share-links", body, content_type="application/json", **bearer(cast, who)).status_code

    assert create("owner", {"sandbox": box.pk}) == 201
    assert create("outsider", {"sandbox": box.pk}) == 403  # someone else's sandbox
    assert create("viewer", {"sandbox": box.pk}) == 403  # may watch, not use
    assert create("operator", {"sandbox": box.pk}) == 201
    assert create("owner", {"sandbox": 999999}) == 404
    # The wall shows every live sandbox: operators and admins only.
    assert create("owner", {"wall": True}) == 403
    assert create("viewer", {"wall": True}) == 403
    assert create("operator", {"wall": True}) == 201
    assert create("staff", {"wall": True}) == 201
    wall = ShareLink.objects.filter(sandbox=None).first()
    assert wall is not None and sharing.link_json(wall, "http://h")["url"].startswith("http://h/wall/?share=")
    assert client.post("/api/share-links", {"sandbox": box.pk}, content_type="application/json").status_code == 401


@pytest.mark.django_db
def test_only_the_creator_or_an_admin_sees_and_revokes_a_link(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox(owner="owner")
    owners, _ = sharing.issue(user(cast, "owner"), sandbox=box)
    operators, _ = sharing.issue(user(cast, "operator"), sandbox=box)

    def ids(who: str) -> list[int]:
        return [e["id"] for e in client.get("/api/share-links", **bearer(cast, who)).json()["share_links"]]

    assert ids("owner") == [owners.pk]
    assert ids("operator") == [operators.pk]
    assert ids("staff") == [operators.pk, owners.pk]
    assert ids("outsider") == []
    for who in ("outsider", "operator"):
        assert client.get(f"/api/share-links/{owners.pk}", **bearer(cast, who)).status_code == 404
        assert client.delete(f"/api/share-links/{owners.pk}", **bearer(cast, who)).status_code == 404
    owners.refresh_from_db()
    assert owners.revoked_at is None
    assert client.delete(f"/api/share-links/{owners.pk}", **bearer(cast, "staff")).status_code == 200
    owners.refresh_from_db()
    assert owners.revoked_by == "staff"
    assert client.get("/api/share-links?sandbox=x", **bearer(cast)).status_code == 400
    assert client.get("/api/share-links/999999", **bearer(cast)).status_code == 404


@pytest.mark.django_db
def test_a_user_has_a_bounded_number_of_active_links(
    client: Client, cast: dict, make_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sharing, "MAX_ACTIVE_PER_USER", 2)
    box = make_sandbox()
    first, _ = sharing.issue(user(cast, "owner"), sandbox=box)
    sharing.issue(user(cast, "owner"), sandbox=box)
    response = client.post("/api/share-links", {"sandbox": box.pk}, content_type="application/json", **bearer(cast))
    assert response.status_code == 429 and response.json()["limit"] == 2
    sharing.revoke(first, by="owner")
    response = client.post("/api/share-links", {"sandbox": box.pk}, content_type="application/json", **bearer(cast))
    assert response.status_code == 201


@pytest.mark.django_db
def test_a_share_token_is_no_credential_of_the_api(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    _link, token = sharing.issue(user(cast, "owner"), sandbox=box)
    as_bearer = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    for method, path, body in [
        ("get", "/api/sandboxes", None),
        ("get", f"/api/sandboxes/{box.pk}", None),
        ("get", f"/api/sandboxes/{box.pk}/events", None),
        ("get", f"/api/sandboxes/{box.pk}/control", None),
        ("post", f"/api/sandboxes/{box.pk}/events", {"text": "hi"}),
        ("post", f"/api/sandboxes/{box.pk}/takeover", None),
        ("delete", f"/api/sandboxes/{box.pk}", None),
        ("get", "/api/share-links", None),
        ("post", "/api/share-links", {"sandbox": box.pk}),
    ]:
        send = getattr(client, method)
        options: dict[str, Any] = {"content_type": "application/json"} if body is not None else {}
        data = [body] if body is not None else []
        assert send(path, *data, **options, **as_bearer).status_code == 401, (method, path)
        assert send(f"{path}?share={token}", *data, **options).status_code == 401, (method, path)
    assert not Event.objects.filter(sandbox=box, kind="person.note").exists()
    assert Sandbox.objects.get(pk=box.pk).phase == "ready"


# --- the page -------------------------------------------------------------------------------

ACTING = (
    'id="takeover-button"',
    'id="handback-button"',
    'id="resume-agent-button"',
    'id="delete-button"',
    'id="restart-button"',
    'id="run-button"',
    'id="pause-button"',
    'id="stop-button"',
    'id="note-form"',
    'id="paste-button"',
    'id="share-button"',
    'id="share-dialog"',
)


@pytest.mark.django_db
def test_the_shared_page_is_read_only_and_needs_no_login(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    link, token = sharing.issue(user(cast, "owner"), sandbox=box)
    response = client.get(f"/sandboxes/{box.pk}/?share={token}")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Shared view · read-only" in page
    assert f'<script id="share-token" type="application/json">"{token}"</script>' in page
    for marker in ACTING:
        assert marker not in page, marker
    assert response["Referrer-Policy"] == "no-referrer" and response["Cache-Control"] == "no-store"
    link.refresh_from_db()
    assert link.uses == 1
    assert Event.objects.filter(sandbox=box, kind="share.opened").count() == 1
    # Without the link the page still wants a login, and the owner's page acts.
    assert client.get(f"/sandboxes/{box.pk}/").status_code == 302
    client.force_login(user(cast, "owner"))
    own = client.get(f"/sandboxes/{box.pk}/").content.decode()
    assert all(marker in own for marker in ACTING) and "share-token" not in own
    # The link shows a logged-in visitor the shared view too: what its holders see.
    assert "Shared view · read-only" in client.get(f"/sandboxes/{box.pk}/?share={token}").content.decode()
    client.force_login(user(cast, "viewer"))
    assert 'id="share-button"' not in client.get(f"/sandboxes/{box.pk}/").content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["tampered", "expired", "revoked", "empty", "another sandbox", "no such sandbox"])
def test_a_bad_link_gets_a_403_page(client: Client, cast: dict, make_sandbox, how: str) -> None:
    box, other = make_sandbox(), make_sandbox()
    link, token = sharing.issue(user(cast, "owner"), sandbox=box)
    target = box.pk
    if how == "tampered":
        token = changed(token, -1)
    elif how == "expired":
        expire(link)
    elif how == "revoked":
        sharing.revoke(link, by="owner")
    elif how == "empty":
        token = ""
    elif how == "another sandbox":
        target = other.pk
    else:
        target = 999999
    response = client.get(f"/sandboxes/{target}/?share={token}")
    assert response.status_code == 403
    page = response.content.decode()
    if how in ("another sandbox", "no such sandbox"):
        assert "This share link is not for this page" in page
    else:
        assert "This share link is no longer valid" in page
    assert response["Referrer-Policy"] == "no-referrer"
    assert not Event.objects.filter(kind="share.opened").exists()
    link.refresh_from_db()
    assert link.uses == 0


# --- websockets, in process -----------------------------------------------------------------


def communicator(path: str, origin: str | None = ORIGIN, token: str | None = None) -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode())] if origin else []
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return WebsocketCommunicator(application, path, headers=headers, subprotocols=["binary"])


async def close_code(comm: WebsocketCommunicator, timeout: float = 5) -> int:
    connected, _ = await comm.connect()
    assert connected, "consumers accept first, then close with a code"
    return await closed(comm, timeout)


async def closed(comm: WebsocketCommunicator, timeout: float = 5) -> int:
    while True:
        message = await comm.receive_output(timeout=timeout)
        if message["type"] == "websocket.close":
            return int(message["code"])


issue = database_sync_to_async(sharing.issue)


@pytest.mark.django_db(transaction=True)
async def test_the_events_socket_serves_a_link_holder_and_nothing_else(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    other = await database_sync_to_async(make_sandbox)()
    owner = await database_sync_to_async(user)(cast, "owner")
    _link, token = await issue(owner, sandbox=box)
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?after=0&share={token}")
    assert (await comm.connect())[0]
    assert await comm.receive_nothing(0.3)  # no event yet (rows made without the services)
    await comm.send_to(text_data="hello")  # the socket only sends, to link holders too
    assert await closed(comm) == Close.BAD_MESSAGE
    # The same token: refused without an Origin, with a foreign one, on another sandbox.
    assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/events/?share={token}", None)) == Close.FORBIDDEN
    foreign = communicator(f"/ws/sandboxes/{box.pk}/events/?share={token}", "http://evil.example")
    assert await close_code(foreign) == Close.FORBIDDEN
    assert await close_code(communicator(f"/ws/sandboxes/{other.pk}/events/?share={token}")) == Close.FORBIDDEN
    assert await close_code(communicator(f"/ws/sandboxes/999999/events/?share={token}")) == Close.FORBIDDEN
    # A bearer token wins over a share parameter (an API client stays who it is).
    as_owner = communicator(f"/ws/sandboxes/{other.pk}/events/?share={token}", token=cast["tokens"]["owner"])
    assert (await as_owner.connect())[0]
    assert await as_owner.receive_nothing(0.3)
    await as_owner.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_link_holder_reads_the_log_live(cast: dict, make_sandbox) -> None:
    from sandboxes import events

    box = await database_sync_to_async(make_sandbox)()
    await database_sync_to_async(events.record)(box.pk, "person.note", "before")
    _link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?share={token}")
    assert (await comm.connect())[0]
    assert json.loads(await comm.receive_from(timeout=5))["text"] == "before"
    await database_sync_to_async(events.record)(box.pk, "person.note", "live")
    assert json.loads(await comm.receive_from(timeout=5))["text"] == "live"
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["tampered", "expired", "revoked", "empty", "another salt"])
@pytest.mark.parametrize("socket", ["events", "screen", "terminal"])
async def test_a_bad_link_is_closed_4403(cast: dict, make_sandbox, how: str, socket: str) -> None:
    box = await database_sync_to_async(make_sandbox)()
    link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    if how == "tampered":
        token = changed(token, len(token) // 2)
    elif how == "expired":
        await database_sync_to_async(expire)(link)
    elif how == "revoked":
        await database_sync_to_async(sharing.revoke)(link, "owner")
    elif how == "empty":
        token = ""
    else:
        token = services.start_page_token(box.pk)
    comm = communicator(f"/ws/sandboxes/{box.pk}/{socket}/?share={token}")
    assert await close_code(comm) == Close.FORBIDDEN


@pytest.mark.django_db(transaction=True)
async def test_a_valid_link_passes_the_checks_of_the_screen_and_terminal(cast: dict, make_sandbox) -> None:
    """No supervisor here: past the checks, a sandbox that cannot be reached closes 1011."""
    box = await database_sync_to_async(make_sandbox)()
    _link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    for socket in ("screen", "terminal"):
        assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/{socket}/?share={token}")) == 1011


@pytest.mark.django_db(transaction=True)
async def test_the_dashboard_cdp_and_agent_sockets_refuse_links(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    _link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    _wall, wall_token = await issue(await database_sync_to_async(user)(cast, "staff"), wall=True)
    for share in (token, wall_token):
        assert await close_code(communicator(f"/ws/sandboxes/?share={share}")) == Close.FORBIDDEN
        assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/cdp/?share={share}")) == Close.UNAUTHENTICATED
        assert await close_code(communicator(f"/ws/agent/1/?share={share}")) == Close.UNAUTHENTICATED


@pytest.mark.django_db(transaction=True)
async def test_revoking_closes_the_open_sockets_of_a_link_at_once(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    _other, other_token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    mine, theirs = (communicator(f"/ws/sandboxes/{box.pk}/events/?share={t}") for t in (token, other_token))
    assert (await mine.connect())[0] and (await theirs.connect())[0]
    started = time.monotonic()
    await database_sync_to_async(sharing.revoke)(link, "owner")
    assert await closed(mine, timeout=2) == Close.FORBIDDEN
    assert time.monotonic() - started < 1.0, "the group message, not the periodic check, closed it"
    assert await theirs.receive_nothing(0.5), "another link's socket stays open"
    await theirs.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_expiring_link_closes_its_sockets_by_itself(
    cast: dict, make_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sharing, "RECHECK_SECONDS", 0.2)
    box = await database_sync_to_async(make_sandbox)()
    link, token = await issue(await database_sync_to_async(user)(cast, "owner"), sandbox=box)
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?share={token}")
    assert (await comm.connect())[0]
    assert await comm.receive_nothing(0.5)
    await database_sync_to_async(expire)(link)
    assert await closed(comm, timeout=2) == Close.FORBIDDEN


# --- a live Namek ---------------------------------------------------------------------------


@pytest.fixture
def box(live_namek: LiveNamek) -> Iterator[dict[str, Any]]:
    with ready_sandbox(live_namek, name="shared") as created:
        yield created


def create_link(namek: LiveNamek, sandbox_id: int, who: str = "owner") -> tuple[int, str]:
    status, link = namek.api("POST", "/api/share-links", who, {"sandbox": sandbox_id, "expires_in": 600})
    assert status == 201, link
    return link["id"], link["url"].split("?share=", 1)[1]


def shared_url(namek: LiveNamek, sandbox_id: int, socket: str, token: str) -> str:
    return f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/{socket}/?share={token}"


@contextlib.asynccontextmanager
async def shared_screen(namek: LiveNamek, sandbox_id: int, token: str) -> AsyncIterator[ClientConnection]:
    """A raw RFB client of the relay with a share link, as a browser's page (with Origin)."""
    async with connect(
        shared_url(namek, sandbox_id, "screen", token),
        subprotocols=["binary"],  # type: ignore[list-item]
        max_size=None,
        origin=namek.base_url,  # type: ignore[arg-type]
        open_timeout=10,
    ) as ws:
        await RelayClient(ws).handshake()
        yield ws


async def shared_terminal(namek: LiveNamek, sandbox_id: int, token: str) -> Viewer:
    ws = await connect(
        shared_url(namek, sandbox_id, "terminal", token),
        origin=namek.base_url,  # type: ignore[arg-type]
        open_timeout=10,
        max_size=None,
    )
    kind, setup = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert kind == "setup", (kind, setup)
    return Viewer(ws, setup)


async def owner_terminal(namek: LiveNamek, sandbox_id: int) -> Viewer:
    headers = {"Authorization": f"Bearer {namek.token()}"}
    ws = await connect(
        f"{namek.ws_base}/ws/sandboxes/{sandbox_id}/terminal/", additional_headers=headers, open_timeout=10
    )
    kind, setup = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert kind == "setup"
    return Viewer(ws, setup)


async def next_setup(viewer: Viewer) -> dict[str, Any]:
    while True:
        kind, *args = json.loads(await asyncio.wait_for(viewer.ws.recv(), 10))
        if kind == "setup":
            return dict(args[0])
        if kind == "stdout":
            viewer.output += args[0]


async def close_of(url: str, origin: str, timeout: float = 10) -> int:
    async with connect(url, origin=origin, open_timeout=10, max_size=None) as ws:  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code
    raise AssertionError("unreachable")


@pytest.mark.processes
async def test_a_link_holders_input_never_reaches_the_sandbox(live_namek: LiveNamek, box: dict[str, Any]) -> None:
    sandbox_id = box["id"]
    _link_id, token = await asyncio.to_thread(create_link, live_namek, sandbox_id)
    async with page_devtools(live_namek, sandbox_id) as cdp:
        assert await cdp.evaluate(PROBE) == "ready"
        x, y = 300, await cdp.evaluate("outerHeight - innerHeight") + 120
        shell = await shared_terminal(live_namek, sandbox_id, token)
        async with shell.ws, shared_screen(live_namek, sandbox_id, token) as share:
            assert shell.setup["readonly"] is True
            # Nobody drives: the link holder's keys, clicks and clipboard are dropped.
            await send_input(share, x, y)
            await shell.type("echo SHARE-$((40+1)) > /tmp/share-probe")
            await asyncio.sleep(1.5)
            assert await probe_state(cdp) == ["", 0]

            # The owner takes over (through the API) and drives at the same time.
            status, state = await asyncio.to_thread(
                live_namek.api, "POST", f"/api/sandboxes/{sandbox_id}/takeover", "owner"
            )
            assert (status, state["state"]) == (200, "you"), state
            owner = await owner_terminal(live_namek, sandbox_id)
            async with owner.ws, screen(live_namek, sandbox_id, "owner") as holder:
                assert owner.setup["readonly"] is False
                await send_input(share, x, y)
                await shell.type("echo SHARE-$((40+2))")
                await asyncio.sleep(1.5)
                assert await probe_state(cdp) == ["", 0], "a link holder's input reached the page"
                # The same bytes from the owner go through, so the path itself works.
                await send_input(holder, x, y)
                assert await wait_value(cdp, "abclip") == ["abclip", 1]
                await owner.type("echo OWNER-$((40+3)); cat /tmp/share-probe 2>&1 | head -c 60")
                await owner.wait_for("OWNER-43")
                await shell.wait_for("OWNER-43")  # the link holder watches the same shell
                await owner.wait_for("No such file")
                assert "SHARE-41" not in owner.output + shell.output
                assert "SHARE-42" not in owner.output + shell.output
                # The link holder's connections are still served, read-only.
                assert await RelayClient(share).full_update()
        status, _ = await asyncio.to_thread(live_namek.api, "POST", f"/api/sandboxes/{sandbox_id}/handback", "owner")
        assert status == 200
    page = (await asyncio.to_thread(live_namek.api, "GET", f"/api/sandboxes/{sandbox_id}/events?limit=1000"))[1]
    handed = [e for e in page["events"] if e["kind"] == "control.handed_back"][-1]
    assert handed["data"]["inputs"] == {"keys": 8, "pointer": 3, "clipboard": 1, "terminal": 1}
    opened = [e for e in page["events"] if e["kind"] == "terminal.opened" and e["actor"].startswith("share link #")]
    assert len(opened) == 1 and opened[0]["data"]["readonly"] is True


@pytest.mark.processes
async def test_bad_links_are_refused_and_revoking_cuts_a_live_viewer_off(
    live_namek: LiveNamek, box: dict[str, Any]
) -> None:
    sandbox_id = box["id"]
    origin = live_namek.base_url
    good_id, good = await asyncio.to_thread(create_link, live_namek, sandbox_id)
    expired_id, expired = await asyncio.to_thread(create_link, live_namek, sandbox_id)
    revoked_id, revoked = await asyncio.to_thread(create_link, live_namek, sandbox_id)
    await asyncio.to_thread(
        live_namek.manage,
        "shell",
        "-c",
        "from datetime import timedelta; from django.utils import timezone; from sandboxes.models import ShareLink; "
        f"ShareLink.objects.filter(pk={expired_id}).update(expires_at=timezone.now() - timedelta(seconds=1))",
    )
    assert (await asyncio.to_thread(live_namek.api, "DELETE", f"/api/share-links/{revoked_id}"))[0] == 200
    for token in (changed(good, len(good) // 2), expired, revoked):
        for socket in ("screen", "terminal", "events"):
            code = await close_of(shared_url(live_namek, sandbox_id, socket, token), origin)
            assert code == Close.FORBIDDEN, (token, socket)
    # An open screen, terminal and log of a link: revoked, all close with 4403 at once.
    async with shared_screen(live_namek, sandbox_id, good) as share:
        shell = await shared_terminal(live_namek, sandbox_id, good)
        log = await connect(shared_url(live_namek, sandbox_id, "events", good), origin=origin)  # type: ignore[arg-type]
        started = time.monotonic()
        assert (await asyncio.to_thread(live_namek.api, "DELETE", f"/api/share-links/{good_id}"))[0] == 200
        for ws in (share, shell.ws, log):
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(sharing.RECHECK_SECONDS):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == Close.FORBIDDEN
        assert time.monotonic() - started < 2.0
    # The page says the link is no longer valid.
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, f"{origin}/sandboxes/{sandbox_id}/?share={good}", None, 10)
    assert refused.value.code == 403 and b"no longer valid" in refused.value.read()


@pytest.mark.processes
@pytest.mark.browser
async def test_the_shared_page_in_a_browser_is_live_and_read_only(
    live_namek: LiveNamek, box: dict[str, Any], browser: Browser
) -> None:
    sandbox_id = box["id"]
    _link_id, token = await asyncio.to_thread(create_link, live_namek, sandbox_id)
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sent: list[bytes] = []  # binary frames the page sends on its screen socket

    def follow(ws: Any) -> None:
        if "/screen/" in ws.url:
            ws.on("framesent", lambda payload: sent.append(payload) if isinstance(payload, bytes) else None)

    page.on("websocket", follow)
    response = await page.goto(f"{live_namek.base_url}/sandboxes/{sandbox_id}/?share={token}")
    assert response is not None and response.status == 200
    assert "/login/" not in page.url
    await page.wait_for_function("document.getElementById('screen-status').textContent === 'Live'", timeout=20000)
    await page.wait_for_function(
        "document.getElementById('terminal-status').textContent === 'Live (read-only)'", timeout=20000
    )
    await page.locator(".event[data-kind='share.opened']").wait_for(timeout=10000)
    assert await page.locator("#share-banner").is_visible()
    assert await page.locator("button:visible").count() == 0, "no button acts in the shared view"
    assert await page.text_content("#control-banner") == "Nobody is driving"
    # noVNC is view-only here: a click and typing on the screen send no RFB input at all.
    assert sent, "the handshake's frames are seen"
    sent.clear()
    await page.locator("#screen canvas").click(position={"x": 200, "y": 200})
    await page.keyboard.type("abc")
    await asyncio.sleep(1.0)
    input_types = {4, 5, 6}  # KeyEvent, PointerEvent, ClientCutText
    assert not [frame for frame in sent if frame[0] in input_types], sent
    # Who drives follows the log: the owner takes over.
    status, _ = await asyncio.to_thread(live_namek.api, "POST", f"/api/sandboxes/{sandbox_id}/takeover", "owner")
    assert status == 200
    await page.wait_for_function(
        "document.getElementById('control-banner').textContent === 'owner is driving'", timeout=10000
    )
    await asyncio.to_thread(live_namek.api, "POST", f"/api/sandboxes/{sandbox_id}/handback", "owner")
    await page.wait_for_function(
        "document.getElementById('control-banner').textContent === 'Nobody is driving'", timeout=10000
    )
    assert errors == []
    await page.close()

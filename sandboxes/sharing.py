"""Read-only share links: signed, expiring, revocable links to one sandbox's page or to
the wall, for people without an account.

A link is a ``ShareLink`` row. Its token is ``django.core.signing`` over the row's id with
this module's own salt (``SALT``): it cannot be guessed or altered, nor made from another
signed value of Namek's (a start-page token signs a sandbox id with another salt). The row
says whether it still works: until ``expires_at``, unless ``revoked_at``, and while its
creator's account is active. ``resolve`` checks all of it, every time.

Where a token is accepted, always as the query parameter ``share=<token>``:

- the sandbox page ``/sandboxes/<id>/?share=T`` (a sandbox link, for its sandbox) and the
  wall ``/wall/?share=T`` (a wall link), without a login;
- the websockets of a sandbox those pages open: screen, terminal and event log
  (``viewer.auth`` sets ``scope["share"]``; ``viewer.consumers.base`` checks ``allows``).

It is never a credential of the JSON API, nor of the dashboard feed, the CDP relay or the
agent bridge. Whoever holds one reads and sends nothing else: the connection has no user,
so it never holds the control lease and the relays drop its input.

Who may (``may_share``, ``may_share_wall``, ``visible_links``):

- a sandbox link: whoever may use the sandbox (``access.can_use``);
- a wall link: operators and admins (the wall shows every live sandbox);
- revoke: the link's creator or an admin; list: one's own links (admins: all).

Revoking publishes ``share.revoked`` to the channel-layer group ``share-<link id>``,
which every websocket opened with the link joins: they close with 4403 at once. Each also
re-resolves its token every ``RECHECK_SECONDS`` (expiry, a revocation another process's
in-memory channel layer could not carry, a deactivated creator).

A use (``record_use``) counts on the row (``uses``, ``last_used_at``); for a sandbox link it
is also a ``share.opened`` event in that sandbox's log. A wall link's uses are counted
only: the wall shows every live sandbox, and an event in each of their logs on every load
of a kiosk screen would drown them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core import signing
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from sandboxes import events
from sandboxes.access import ADMIN, OPERATOR, can_use, is_admin, role
from sandboxes.models import LIVE_PHASES, Sandbox, ShareLink, Source

log = logging.getLogger(__name__)

SALT = "namek.share-link"
DEFAULT_EXPIRES_IN = 24 * 3600
MIN_EXPIRES_IN = 60
MAX_EXPIRES_IN = 30 * 24 * 3600
#: active links one user may have at a time
MAX_ACTIVE_PER_USER = 100
#: links one list (``GET /api/share-links``) answers at most
LIST_LIMIT = 200
#: how often a websocket opened with a link re-resolves its token
RECHECK_SECONDS = 5.0
#: longer than any token ``token_for`` makes: anything longer is not read at all
MAX_TOKEN_LENGTH = 200
WALL_PATH = "/wall/"


@dataclass(frozen=True)
class Grant:
    """What a valid token gives: read-only access to one sandbox, or to the wall."""

    link_id: int
    sandbox_id: int | None
    wall: bool


class ShareError(ValueError):
    """A link that cannot be made or changed as asked; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400, limit: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.limit = limit


def group_name(link_id: int) -> str:
    return f"share-{link_id}"


def actor(link_id: int) -> str:
    """How a link's viewers are named in the event log."""
    return f"share link #{link_id}"


# --- tokens ---------------------------------------------------------------------------------


def token_for(link: ShareLink) -> str:
    """The link's token (the same every time: a link's URL can be shown again)."""
    return signing.Signer(salt=SALT).sign_object(link.pk)


def link_id_of(token: Any) -> int | None:
    """The link id a token was signed over, or None when it is not a share token."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        value = signing.Signer(salt=SALT).unsign_object(token)
    except (signing.BadSignature, ValueError):
        return None
    return value if type(value) is int and value > 0 else None


def resolve(token: Any) -> Grant | None:
    """The token's grant; None for a tampered, unknown, expired or revoked one."""
    link_id = link_id_of(token)
    if link_id is None:
        return None
    link = ShareLink.objects.select_related("created_by").filter(pk=link_id).first()
    if link is None or not link.active_at(timezone.now()) or not link.created_by.is_active:
        return None
    return Grant(link_id=link.pk, sandbox_id=link.sandbox_id, wall=link.wall)


def allows(grant: Grant | None, sandbox_id: int) -> bool:
    """A sandbox link: its own sandbox only. A wall link: any sandbox that is live."""
    if grant is None:
        return False
    if not grant.wall:
        return grant.sandbox_id == sandbox_id
    return Sandbox.objects.filter(pk=sandbox_id, phase__in=LIVE_PHASES).exists()


def record_use(grant: Grant, where: str) -> None:
    """Count a use of the link, and log it on its sandbox (not for wall links: see above)."""
    where = str(where)[:40]
    ShareLink.objects.filter(pk=grant.link_id).update(uses=F("uses") + 1, last_used_at=timezone.now())
    if grant.wall or grant.sandbox_id is None:
        log.info("share link %s (the wall) opened: %s", grant.link_id, where)
        return
    events.record(
        grant.sandbox_id,
        "share.opened",
        f"Opened through read-only share link #{grant.link_id} ({where})",
        source=Source.SYSTEM,
        actor=actor(grant.link_id),
        data={"link": grant.link_id, "where": where, "wall": False},
    )


# --- links ----------------------------------------------------------------------------------


def may_share(user: Any, sandbox: Sandbox) -> bool:
    return can_use(user, sandbox)


def may_share_wall(user: Any) -> bool:
    return bool(user.is_authenticated and user.is_active and role(user) in (ADMIN, OPERATOR))


def issue(
    user: Any, *, sandbox: Sandbox | int | None = None, wall: bool = False, expires_in: int | None = None
) -> tuple[ShareLink, str]:
    """A new link and its token. ShareError: 400 for a bad request, 404 for no such
    sandbox, 403 when the user may not share it, 429 past ``MAX_ACTIVE_PER_USER``."""
    if expires_in is None:
        expires_in = DEFAULT_EXPIRES_IN
    if type(expires_in) is not int or not MIN_EXPIRES_IN <= expires_in <= MAX_EXPIRES_IN:
        raise ShareError(
            f"expires_in: a whole number of seconds from {MIN_EXPIRES_IN} (a minute) "
            f"to {MAX_EXPIRES_IN} (30 days); missing: {DEFAULT_EXPIRES_IN} (24 hours)"
        )
    if sandbox is not None and wall:
        raise ShareError("give sandbox (a sandbox's id) or wall: true, not both")
    if sandbox is None and not wall:
        raise ShareError("give sandbox (a sandbox's id) or wall: true")
    if isinstance(sandbox, int):
        found = Sandbox.objects.filter(pk=sandbox).first()
        if found is None:
            raise ShareError(f"no sandbox {sandbox}", 404)
        sandbox = found
    if sandbox is not None and not may_share(user, sandbox):
        raise ShareError("not allowed: only those who may use a sandbox share it", 403)
    if wall and not may_share_wall(user):
        raise ShareError("not allowed: only operators and admins share the wall", 403)
    now = timezone.now()
    if active_links(user).count() >= MAX_ACTIVE_PER_USER:
        raise ShareError(
            f"you already have {MAX_ACTIVE_PER_USER} active share links, the most one user may have: revoke one",
            429,
            MAX_ACTIVE_PER_USER,
        )
    link = ShareLink.objects.create(
        sandbox=sandbox, created_by=user, created_at=now, expires_at=now + timedelta(seconds=expires_in)
    )
    log.info("%s created %s, expiring %s", user.get_username(), link, link.expires_at.isoformat())
    return link, token_for(link)


def active_links(user: Any) -> QuerySet[ShareLink]:
    return ShareLink.objects.filter(created_by=user, revoked_at__isnull=True, expires_at__gt=timezone.now())


def visible_links(user: Any) -> QuerySet[ShareLink]:
    """The links a user may list and revoke: their own; an admin's: all."""
    links = ShareLink.objects.select_related("created_by")
    return links if is_admin(user) else links.filter(created_by_id=user.pk)


def revoke(link: ShareLink, by: str) -> ShareLink:
    """Revoke the link (again: no change); its open websockets close once this commits."""
    if link.revoked_at is None:
        link.revoked_at = timezone.now()
        link.revoked_by = by[:150]
        link.save(update_fields=["revoked_at", "revoked_by"])
        link_id = link.pk
        transaction.on_commit(lambda: _publish_revoked(link_id))
        log.info("%s revoked %s", by, link)
    return link


def _publish_revoked(link_id: int) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(link_id), {"type": "share.revoked", "link": link_id})
    except Exception:  # the sockets find out by themselves within RECHECK_SECONDS
        log.exception("publishing the revocation of share link %s failed", link_id)


def path_for(link: ShareLink, token: str) -> str:
    """The page the link opens, with its token."""
    page = WALL_PATH if link.wall else f"/sandboxes/{link.sandbox_id}/"
    return f"{page}?share={token}"


def link_json(link: ShareLink, base_url: str) -> dict[str, Any]:
    """A link as the API shows it to its creator (or an admin); ``url`` is absolute."""
    now = timezone.now()
    return {
        "id": link.pk,
        "url": base_url.rstrip("/") + path_for(link, token_for(link)),
        "expires_at": link.expires_at.isoformat(),
        "sandbox": link.sandbox_id,
        "wall": link.wall,
        "created_by": link.created_by.get_username(),
        "created_at": link.created_at.isoformat(),
        "revoked_at": link.revoked_at.isoformat() if link.revoked_at else None,
        "active": link.active_at(now),
        "uses": link.uses,
        "last_used_at": link.last_used_at.isoformat() if link.last_used_at else None,
    }

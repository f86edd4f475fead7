"""Websocket authentication: the session cookie (Channels), a bearer token, or a
read-only share link's token in the query string (``share=``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser

from sandboxes import runs, sharing
from sandboxes.access import load_role
from sandboxes.auth import bearer_token, user_for_token
from sandboxes.models import AgentRun


class TokenAuthMiddleware:
    """Sets ``scope["user"]`` from ``Authorization: Bearer`` and records how the user
    was authenticated in ``scope["auth_method"]`` ("token", "session", "run" or None).

    A run's token (``nmkrun_...``) authenticates no user: it sets ``scope["agent_run"]``
    to ``{"id", "sandbox_id"}`` of its active run, for the bridge and the CDP relay.

    Without an Authorization header, a ``share`` query parameter makes the connection a
    share link's (auth_method "share"), with no user even if a session cookie came along:
    the page that opened it is the read-only shared view, whoever looks at it.
    ``scope["share"]`` is the ``sharing.Grant``, left unset when the token is not valid
    (tampered, expired, revoked): the consumers then close with 4403."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = dict(scope)
        headers = dict(scope.get("headers", []))
        header = headers.get(b"authorization", b"").decode("latin-1")
        token = bearer_token(header) if header else None
        if token and token.startswith(AgentRun.TOKEN_PREFIX):
            run = await database_sync_to_async(runs.run_for_token)(token)
            scope["user"] = AnonymousUser()
            scope["auth_method"] = "run" if run else None
            if run:
                scope["agent_run"] = {"id": run.pk, "sandbox_id": run.sandbox_id}
        elif header:
            user = await database_sync_to_async(user_for_token)(token) if token else None
            scope["user"] = user or AnonymousUser()
            scope["auth_method"] = "token" if user else None
        elif (share := share_token(scope)) is not None:
            grant = await database_sync_to_async(sharing.resolve)(share)
            scope["user"] = AnonymousUser()
            scope["auth_method"] = "share"
            if grant is not None:
                scope["share"] = grant
        else:
            user = scope.get("user")
            scope["auth_method"] = "session" if user is not None and user.is_authenticated else None
        if scope.get("auth_method") in ("token", "session"):
            # Consumers check rights on the event loop, where no query may run.
            await database_sync_to_async(load_role)(scope["user"])
        return await self.inner(scope, receive, send)


def share_token(scope: dict[str, Any]) -> str | None:
    """The query string's ``share`` (the last one given), or None without one."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    values = query.get("share")
    return values[-1] if values else None


def WebsocketAuthStack(inner: Any) -> Any:
    return AuthMiddlewareStack(TokenAuthMiddleware(inner))

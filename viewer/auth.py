"""Websocket authentication: the session cookie (Channels) or a bearer token."""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser

from sandboxes import runs
from sandboxes.access import load_role
from sandboxes.auth import bearer_token, user_for_token
from sandboxes.models import AgentRun


class TokenAuthMiddleware:
    """Sets ``scope["user"]`` from ``Authorization: Bearer`` and records how the user
    was authenticated in ``scope["auth_method"]`` ("token", "session", "run" or None).

    A run's token (``nmkrun_...``) authenticates no user: it sets ``scope["agent_run"]``
    to ``{"id", "sandbox_id"}`` of its active run, for the bridge and the CDP relay."""

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
        else:
            user = scope.get("user")
            scope["auth_method"] = "session" if user is not None and user.is_authenticated else None
        if scope.get("auth_method") in ("token", "session"):
            # Consumers check rights on the event loop, where no query may run.
            await database_sync_to_async(load_role)(scope["user"])
        return await self.inner(scope, receive, send)


def WebsocketAuthStack(inner: Any) -> Any:
    return AuthMiddlewareStack(TokenAuthMiddleware(inner))

"""API tokens: who sent a request, by session cookie or ``Authorization: Bearer``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from django.utils import timezone

from sandboxes.models import ApiToken

#: ``last_used_at`` is only rewritten when older than this: a write per request would
#: serialise every API call on SQLite's write lock
LAST_USED_RESOLUTION = timedelta(seconds=60)


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def user_for_token(token: str) -> Any | None:
    record = ApiToken.objects.active().select_related("user").filter(digest=ApiToken.hash(token)).first()
    if record is None:
        return None
    now = timezone.now()
    if record.last_used_at is None or now - record.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=record.pk).update(last_used_at=now)
    return record.user


def authenticate_request(request: HttpRequest) -> tuple[Any, str | None]:
    """(user, method) for an API request: method is "token", "session" or None."""
    header = request.headers.get("Authorization", "")
    if header:
        token = bearer_token(header)
        user = user_for_token(token) if token else None
        return (user, "token") if user is not None else (AnonymousUser(), None)
    if request.user.is_authenticated:
        return request.user, "session"
    return AnonymousUser(), None

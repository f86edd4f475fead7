"""Who may see and use which sandbox. The takeover issue adds the viewer/operator groups."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from sandboxes.models import Sandbox


def is_admin(user: Any) -> bool:
    return bool(user.is_active and (user.is_staff or user.is_superuser))


def visible_sandboxes(user: Any) -> QuerySet[Sandbox]:
    sandboxes = Sandbox.objects.select_related("owner")
    return sandboxes if is_admin(user) else sandboxes.filter(owner_id=user.pk)


def can_view(user: Any, sandbox: Sandbox) -> bool:
    return bool(user.is_authenticated and user.is_active and (is_admin(user) or sandbox.owner_id == user.pk))


def can_use(user: Any, sandbox: Sandbox) -> bool:
    """Send input to the screen, delete: for now the same people who may see it."""
    return can_view(user, sandbox)


def may_see_owner(user: Any, owner_id: int) -> bool:
    """For fan-out messages that carry only the owner's id."""
    return bool(is_admin(user) or owner_id == user.pk)

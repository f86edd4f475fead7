"""Who may see and use which sandbox: roles as Django groups.

============ ====================================================================
role         rights
============ ====================================================================
admin        staff and superusers: everything
``operator`` sees every sandbox; creates and deletes sandboxes, runs agents, takes
             over any sandbox
``viewer``   sees every sandbox (screen, terminal output, log), changes nothing
(no group)   creates sandboxes, and has the operator's rights over their own
============ ====================================================================

"Use" (``can_use``) is every right beyond seeing: delete, restart the browser, run and
command agents, write notes, take over. Input reaches a sandbox only from the holder of
its control lease (``sandboxes.control``), which only a user who may use it can take.

A user's role is read from the database once per user object and kept on it
(``role``): websocket code, which must not query from the event loop, has it loaded by
the authentication middleware (``load_role``).
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from sandboxes.models import Sandbox

ADMIN, OPERATOR, VIEWER, OWNER = "admin", "operator", "viewer", ""
#: the groups that carry a role, strongest first
ROLE_GROUPS = (OPERATOR, VIEWER)
_CACHE = "_namek_role"


def role(user: Any) -> str:
    """``admin``, ``operator``, ``viewer`` or ``""`` (rights over one's own sandboxes)."""
    if not (user.is_authenticated and user.is_active):
        return OWNER
    if user.is_staff or user.is_superuser:
        return ADMIN
    cached = getattr(user, _CACHE, None)
    if cached is None:
        names = set(user.groups.filter(name__in=ROLE_GROUPS).values_list("name", flat=True))
        cached = next((name for name in ROLE_GROUPS if name in names), OWNER)
        setattr(user, _CACHE, cached)
    return str(cached)


def load_role(user: Any) -> None:
    """Read the user's role now (call in a thread, from async code)."""
    if user is not None and user.is_authenticated:
        role(user)


def is_admin(user: Any) -> bool:
    return bool(user.is_active and (user.is_staff or user.is_superuser))


def sees_all(user: Any) -> bool:
    return role(user) in (ADMIN, OPERATOR, VIEWER)


def visible_sandboxes(user: Any) -> QuerySet[Sandbox]:
    sandboxes = Sandbox.objects.select_related("owner", "lease__user", "lease__run")
    return sandboxes if sees_all(user) else sandboxes.filter(owner_id=user.pk)


def can_view(user: Any, sandbox: Sandbox) -> bool:
    return may_see_owner(user, sandbox.owner_id)


def can_use(user: Any, sandbox: Sandbox) -> bool:
    """Delete, restart, run agents, write notes, take over (see the table above)."""
    if not (user.is_authenticated and user.is_active):
        return False
    kind = role(user)
    return kind in (ADMIN, OPERATOR) or (kind == OWNER and sandbox.owner_id == user.pk)


def can_create(user: Any) -> bool:
    return bool(user.is_authenticated and user.is_active and role(user) != VIEWER)


def may_see_owner(user: Any, owner_id: int) -> bool:
    """For fan-out messages that carry only the owner's id."""
    if not (user.is_authenticated and user.is_active):
        return False
    return sees_all(user) or owner_id == user.pk

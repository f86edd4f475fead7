"""The wall page (``/wall/``) and its counters for staff (``/wall/stats``).

``/wall/`` needs a login, or a valid wall share link (``?share=<token>``: anyone holding
it watches every live sandbox, read-only). ``?kiosk=1`` is the full-screen kiosk layout;
``?rotate=SECONDS`` (3 to 3600, default 15) how long the kiosk shows each sandbox.
"""

from __future__ import annotations

import math
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from sandboxes.access import is_admin
from sandboxes.auth import authenticate_request
from viewer import wall

ROTATE_DEFAULT = 15.0
ROTATE_MIN, ROTATE_MAX = 3.0, 3600.0


def share_grant(token: str) -> Any | None:
    """The grant of a valid share link (``sandboxes.sharing``), else None."""
    try:
        from sandboxes import sharing
    except ImportError:  # share links are not in this build
        return None
    return sharing.resolve(token)


def rotate_seconds(value: str | None) -> float:
    try:
        seconds = float(value) if value else ROTATE_DEFAULT
    except ValueError:
        return ROTATE_DEFAULT
    if not math.isfinite(seconds):
        return ROTATE_DEFAULT
    return min(max(seconds, ROTATE_MIN), ROTATE_MAX)


@require_GET
def wall_page(request: HttpRequest) -> HttpResponse:
    shared = "share" in request.GET
    token = request.GET.get("share", "")
    if shared:
        grant = share_grant(token)
        if grant is None or not grant.wall:  # a sandbox's link does not open the wall
            response = render(request, "namek/share_refused.html", {"mismatch": grant is not None}, status=403)
            return private(response)
        from sandboxes import sharing

        sharing.record_use(grant, "wall")
    if not shared and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    context = {
        "kiosk": request.GET.get("kiosk", "") in ("1", "true", "yes", "on"),
        "rotate": rotate_seconds(request.GET.get("rotate")),
        "share": token if shared else "",
    }
    response = render(request, "namek/wall.html", context)
    return private(response) if shared else response


def private(response: HttpResponse) -> HttpResponse:
    """A page whose URL holds a share token: never sent on as a Referer, never cached."""
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def wall_stats(request: HttpRequest) -> HttpResponse:
    """This process's wall counters (``viewer.wall.stats``), for staff: frames read,
    thumbnails encoded and sent, the encoding threads' CPU seconds."""
    user, method = authenticate_request(request)
    if method is None:
        return JsonResponse({"error": "authentication required"}, status=401)
    if not is_admin(user):
        return JsonResponse({"error": "staff only"}, status=403)
    return JsonResponse(wall.stats())

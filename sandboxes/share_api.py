"""The JSON API of read-only share links (``sandboxes.sharing``): create, list, read and
revoke. Authentication as for the rest of the API (bearer token or session); a share
link's own token is never accepted here.

- ``POST /api/share-links`` ``{"sandbox": id}`` or ``{"wall": true}``, optional
  ``"expires_in"`` (seconds, 60 to 30 days, default 24 hours) → 201 with the link;
- ``GET /api/share-links[?sandbox=<id>&all=1]``: your links (an admin's: everyone's),
  newest first; only active ones unless ``all``;
- ``GET /api/share-links/<id>``, ``DELETE /api/share-links/<id>`` (revokes; 200 with the
  link, also when it was revoked already). Someone else's link is a 404, as in the list.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from namek_web.errors import json_error
from sandboxes import sharing
from sandboxes.api import BadBody, _json_body, api_view
from sandboxes.events import MAX_SEQ, parse_seq
from sandboxes.models import ShareLink

CREATE_FIELDS = {"sandbox", "wall", "expires_in"}


def _base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/")


def _error(exc: sharing.ShareError) -> HttpResponse:
    extra = {"limit": exc.limit} if exc.limit is not None else {}
    return json_error(exc.status, str(exc), **extra)


@api_view(("GET", "POST"))
def share_links(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return _list(request)
    body = _json_body(request, CREATE_FIELDS)
    sandbox, wall, expires_in = body.get("sandbox"), body.get("wall", False), body.get("expires_in")
    if sandbox is not None and (type(sandbox) is not int or not 1 <= sandbox <= MAX_SEQ):
        raise BadBody("sandbox: must be a sandbox's id (a whole number)")
    if type(wall) is not bool:
        raise BadBody("wall: must be true or false")
    if "expires_in" in body and type(expires_in) is not int:
        raise BadBody("expires_in: must be a whole number of seconds")
    try:
        link, _token = sharing.issue(request.user, sandbox=sandbox, wall=wall, expires_in=expires_in)
    except sharing.ShareError as exc:
        return _error(exc)
    return JsonResponse(sharing.link_json(link, _base_url(request)), status=201)


def _list(request: HttpRequest) -> HttpResponse:
    links = sharing.visible_links(request.user)
    sandbox = request.GET.get("sandbox")
    if sandbox is not None:
        try:
            links = links.filter(sandbox_id=parse_seq(sandbox, "sandbox", 0))
        except ValueError:
            raise BadBody(f"sandbox: must be a sandbox's id, not {sandbox[:40]!r}") from None
    if request.GET.get("all") not in ("1", "true", "yes"):
        links = links.filter(revoked_at__isnull=True, expires_at__gt=timezone.now())
    base_url = _base_url(request)
    return JsonResponse({"share_links": [sharing.link_json(link, base_url) for link in links[: sharing.LIST_LIMIT]]})


def _find(request: HttpRequest, link_id: int) -> ShareLink | HttpResponse:
    link = sharing.visible_links(request.user).filter(pk=link_id).first()
    return link if link is not None else json_error(404, f"no share link {link_id}")


@api_view(("GET", "DELETE"))
def share_link(request: HttpRequest, link_id: int) -> HttpResponse:
    found = _find(request, link_id)
    if isinstance(found, HttpResponse):
        return found
    if request.method == "DELETE":
        found = sharing.revoke(found, by=request.user.get_username())
    return JsonResponse(sharing.link_json(found, _base_url(request)))

"""Errors as JSON under /api/, as plain pages elsewhere."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import bad_request as plain_bad_request
from django.views.defaults import page_not_found, server_error


def json_error(status: int, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    if _is_api(request):
        return json_error(403, f"CSRF check failed: {reason}")
    return HttpResponse(
        "<h1>Forbidden</h1><p>The form was stale or came from another site. Reload the page and try again.</p>",
        status=403,
    )


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return json_error(404, "not found")
    return page_not_found(request, exception or Exception())


def internal_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return json_error(500, "internal error")
    return server_error(request)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Requests Django refuses itself (too big a body, too many fields)."""
    if _is_api(request):
        return json_error(400, f"bad request: {exception or 'refused'}")
    return plain_bad_request(request, exception or Exception())

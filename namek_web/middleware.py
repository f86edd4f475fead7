"""Middleware of Namek's own. Each works in both modes: one sync-only middleware would
make Django run every async view (the take-over's wait) in its one thread for sync code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest
from django.http.request import split_domain_port
from django.http.response import HttpResponseBase as HttpResponse


class PlainHttpForSandboxes:
    """Sandboxes' browsers reach Namek over plain HTTP at NAMEK_INTERNAL_URL (the start
    page, the demo site with its session and CSRF cookies), also when NAMEK_HTTPS makes
    every cookie Secure for people, who come through the TLS proxy. A browser drops a
    Secure cookie set over HTTP, so for plain-HTTP requests to the internal host the
    flag is taken off again; every other response keeps it."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.internal_host = (urlsplit(settings.NAMEK_INTERNAL_URL).hostname or "").lower()
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if iscoroutinefunction(self):
            return self._acall(request)
        return self._adjust(request, self.get_response(request))  # type: ignore[arg-type]

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        response = await self.get_response(request)  # type: ignore[misc]
        return self._adjust(request, response)

    def _adjust(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if settings.NAMEK_HTTPS and response.cookies and not request.is_secure() and self._internal(request):
            for morsel in response.cookies.values():
                morsel["secure"] = ""
        return response

    def _internal(self, request: HttpRequest) -> bool:
        domain, _port = split_domain_port(request.get_host())
        return bool(domain) and domain == self.internal_host.strip("[]")

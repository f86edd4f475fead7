"""The pages: dashboard, sandbox page, and the start page a sandbox's browser opens."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.clickjacking import xframe_options_deny

from sandboxes import services
from sandboxes.access import can_view, visible_sandboxes
from sandboxes.models import Phase, Sandbox


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    sandboxes = visible_sandboxes(request.user).exclude(phase=Phase.STOPPED)
    return render(
        request,
        "namek/dashboard.html",
        {"sandboxes": [services.sandbox_json(s) for s in sandboxes]},
    )


@login_required
def sandbox_page(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    sandbox = Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()
    if sandbox is None:
        raise Http404("no such sandbox")
    if not can_view(request.user, sandbox):
        return render(request, "namek/forbidden.html", status=403)
    return render(request, "namek/sandbox.html", {"sandbox": services.sandbox_json(sandbox)})


@xframe_options_deny
def start_page(request: HttpRequest, token: str) -> HttpResponse:
    """What a sandbox's Chromium shows first: its name on a coloured banner.

    Reached without a login (the sandbox's browser has none) through a signed token.
    """
    sandbox = services.sandbox_from_start_token(token)
    if sandbox is None:
        raise Http404("no such sandbox")
    return render(request, "namek/start.html", {"sandbox": sandbox})

"""The pages: dashboard, sandbox page, and the start page a sandbox's browser opens."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.clickjacking import xframe_options_deny

from sandboxes import control, runs, services
from sandboxes.access import can_create, can_use, can_view, visible_sandboxes
from sandboxes.models import ACTIVE_RUN_STATUSES, Phase, Sandbox

#: the demo the dashboard's "Run demo" starts
DASHBOARD_DEMO = "quote"


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    sandboxes = visible_sandboxes(request.user).exclude(phase=Phase.STOPPED)
    return render(
        request,
        "namek/dashboard.html",
        {
            "sandboxes": [services.sandbox_json(s) for s in sandboxes],
            "may_create": can_create(request.user),
            "demo": DASHBOARD_DEMO if DASHBOARD_DEMO in runs.demos() else next(iter(runs.demos()), ""),
        },
    )


@login_required
def sandbox_page(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    sandbox = Sandbox.objects.select_related("owner", "lease__user", "lease__run").filter(pk=sandbox_id).first()
    if sandbox is None:
        raise Http404("no such sandbox")
    if not can_view(request.user, sandbox):
        return render(request, "namek/forbidden.html", status=403)
    active = sandbox.runs.filter(status__in=ACTIVE_RUN_STATUSES).select_related("started_by").first()
    control.expire_lapsed()
    context = {
        "sandbox": services.sandbox_json(sandbox),
        "control": control.state_json(control.lease_of(sandbox.pk), request.user),
        "may_use": can_use(request.user, sandbox),
        "active_run": runs.run_json(active) if active else None,
        "demos": list(runs.demos()),
        "llm_configured": settings.NAMEK_LLM_CONFIGURED,
        "llm_model": settings.NAMEK_LLM_MODEL,
    }
    return render(request, "namek/sandbox.html", context)


@xframe_options_deny
def start_page(request: HttpRequest, token: str) -> HttpResponse:
    """What a sandbox's Chromium shows first: its name on a coloured banner.

    Reached without a login (the sandbox's browser has none) through a signed token.
    """
    sandbox = services.sandbox_from_start_token(token)
    if sandbox is None:
        raise Http404("no such sandbox")
    return render(request, "namek/start.html", {"sandbox": sandbox})

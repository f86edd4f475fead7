"""The pages: dashboard, sandbox page, and the start page a sandbox's browser opens.

The sandbox page with ``?share=<token>`` is the read-only shared view (``sandboxes.sharing``):
no login, whoever opens it; a token that is not valid for that sandbox answers 403.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.clickjacking import xframe_options_deny

from sandboxes import control, runs, services, sharing
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


def sandbox_page(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    if "share" in request.GET:
        return shared_sandbox_page(request, sandbox_id, request.GET["share"])
    return own_sandbox_page(request, sandbox_id)


@login_required
def own_sandbox_page(request: HttpRequest, sandbox_id: int) -> HttpResponse:
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
        "may_share": sharing.may_share(request.user, sandbox),
        "active_run": runs.run_json(active) if active else None,
        "demos": list(runs.demos()),
        "llm_configured": settings.NAMEK_LLM_CONFIGURED,
        "llm_model": settings.NAMEK_LLM_MODEL,
    }
    return render(request, "namek/sandbox.html", context)


def shared_sandbox_page(request: HttpRequest, sandbox_id: int, token: str) -> HttpResponse:
    """The page for whoever holds a share link: the same three live panes, nothing that acts.
    Logged in or not, the visitor sees what everyone with the link sees."""
    grant = sharing.resolve(token)
    if grant is None or not sharing.allows(grant, sandbox_id):
        return _share_refused(request, mismatch=grant is not None)
    sharing.record_use(grant, "page")  # first: the page's log then starts with it
    sandbox = Sandbox.objects.select_related("owner", "lease__user", "lease__run").filter(pk=sandbox_id).first()
    if sandbox is None:
        raise Http404("no such sandbox")
    active = sandbox.runs.filter(status__in=ACTIVE_RUN_STATUSES).first()
    control.expire_lapsed()
    lease = control.lease_of(sandbox.pk)
    context = {
        "sandbox": services.sandbox_json(sandbox),
        "control": {**control.summary(lease), "version": lease.version},
        "may_use": False,
        "may_share": False,
        "share": token,
        "active_run": runs.run_json(active) if active else None,
    }
    response = render(request, "namek/sandbox.html", context)
    _private(response)
    return response


def _share_refused(request: HttpRequest, *, mismatch: bool) -> HttpResponse:
    response = render(request, "namek/share_refused.html", {"mismatch": mismatch}, status=403)
    _private(response)
    return response


def _private(response: HttpResponse) -> None:
    """A page whose URL holds a share token: never sent on as a Referer, never cached."""
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "no-store"


@xframe_options_deny
def start_page(request: HttpRequest, token: str) -> HttpResponse:
    """What a sandbox's Chromium shows first: its name on a coloured banner.

    Reached without a login (the sandbox's browser has none) through a signed token.
    """
    sandbox = services.sandbox_from_start_token(token)
    if sandbox is None:
        raise Http404("no such sandbox")
    return render(request, "namek/start.html", {"sandbox": sandbox})

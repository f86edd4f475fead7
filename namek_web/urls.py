from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from namek_web import health
from sandboxes import api, share_api
from sandboxes import openapi as api_docs
from viewer import replay, views, wall_views

handler400 = "namek_web.errors.bad_request"
handler404 = "namek_web.errors.not_found"
handler500 = "namek_web.errors.internal_error"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("sandboxes/<int:sandbox_id>/", views.sandbox_page, name="sandbox"),
    path("sandboxes/start/<str:token>/", views.start_page, name="sandbox-start"),
    path("sandboxes/<int:sandbox_id>/runs/<int:run_id>/replay/", replay.replay_page, name="replay"),
    path("sandboxes/<int:sandbox_id>/runs/<int:run_id>/replay/export", replay.replay_export, name="replay-export"),
    path(
        "sandboxes/<int:sandbox_id>/runs/<int:run_id>/replay/recording",
        replay.replay_recording,
        name="replay-recording",
    ),
    path("wall/", wall_views.wall_page, name="wall"),
    path("wall/stats", wall_views.wall_stats, name="wall-stats"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("demo/", include("viewer.demo")),
    path("api/openapi.json", api_docs.openapi_json, name="api-openapi"),
    path("api/docs", api_docs.api_docs, name="api-docs"),
    path("api/sandboxes", api.sandboxes, name="api-sandboxes"),
    path("api/sandboxes/<int:sandbox_id>", api.sandbox_detail, name="api-sandbox"),
    path("api/sandboxes/<int:sandbox_id>/restart-browser", api.restart_browser, name="api-restart-browser"),
    path("api/sandboxes/<int:sandbox_id>/events", api.sandbox_events, name="api-events"),
    path(
        "api/sandboxes/<int:sandbox_id>/events/<int:seq>/screenshot",
        api.event_image,
        {"which": "screenshot"},
        name="api-event-screenshot",
    ),
    path(
        "api/sandboxes/<int:sandbox_id>/events/<int:seq>/thumbnail",
        api.event_image,
        {"which": "thumbnail"},
        name="api-event-thumbnail",
    ),
    path("api/sandboxes/<int:sandbox_id>/runs", api.sandbox_runs, name="api-runs"),
    path("api/sandboxes/<int:sandbox_id>/control", api.sandbox_control, name="api-control"),
    path("api/sandboxes/<int:sandbox_id>/takeover", api.takeover, name="api-takeover"),
    path("api/sandboxes/<int:sandbox_id>/handback", api.handback, name="api-handback"),
    path("api/runs/<int:run_id>", api.run_detail, name="api-run"),
    path("api/runs/<int:run_id>/stop", api.run_command, {"command": "stop"}, name="api-run-stop"),
    path("api/runs/<int:run_id>/pause", api.run_command, {"command": "pause"}, name="api-run-pause"),
    path("api/runs/<int:run_id>/resume", api.run_command, {"command": "resume"}, name="api-run-resume"),
    path("api/share-links", share_api.share_links, name="api-share-links"),
    path("api/share-links/<int:link_id>", share_api.share_link, name="api-share-link"),
    re_path(r"^api/(?P<rest>.*)$", api.api_not_found),
]

from django.contrib import admin
from django.urls import include, path

from agentops import metrics, views
from agentops.api import api

urlpatterns = [
    path("", views.overview, name="home"),
    path("accounts/tokens/", include("agentops.urls_tokens")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("tasks/", include("tasks.urls")),
    path("runs/", include("tasks.urls_runs")),
    path("tools/", include("tasks.urls_tools")),
    path("approvals/", include("approvals.urls")),
    path("hooks/", include("triggers.urls")),
    path("api/", api.urls),
    path("metrics", metrics.metrics_view, name="metrics"),
]

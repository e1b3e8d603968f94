from django.contrib import admin
from django.urls import include, path

from agentops import views

urlpatterns = [
    path("", views.overview, name="home"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("tasks/", include("tasks.urls")),
    path("runs/", include("tasks.urls_runs")),
    path("tools/", include("tasks.urls_tools")),
    path("approvals/", include("approvals.urls")),
    path("hooks/", include("triggers.urls")),
]

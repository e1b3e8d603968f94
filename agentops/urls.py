from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="runs:list"), name="home"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("tasks/", include("tasks.urls")),
    path("runs/", include("tasks.urls_runs")),
    path("tools/", include("tasks.urls_tools")),
    path("approvals/", include("approvals.urls")),
    path("hooks/", include("triggers.urls")),
]

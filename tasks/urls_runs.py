from django.urls import include, path

from tasks import views, views_live

app_name = "runs"
urlpatterns = [
    path("", views.run_list, name="list"),
    path("live/", views_live.trail_live, name="trail_live"),
    path("<uuid:run_id>/", views.run_detail, name="detail"),
    path("<uuid:run_id>/live/", views_live.run_live, name="live"),
    path("<uuid:run_id>/changes/", views_live.run_changes, name="changes"),
    path("<uuid:run_id>/cancel/", views.run_cancel_view, name="cancel"),
    path("<uuid:run_id>/incident/", views.run_incident, name="incident"),
    path("<uuid:run_id>/lineage/", include("lineage.urls")),
]

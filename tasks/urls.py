from django.urls import path

from tasks import views, views_governance

app_name = "tasks"
urlpatterns = [
    path("", views.task_list, name="list"),
    # Two segments, so no task's slug can shadow them.
    path("changes/waiting/", views_governance.config_changes_waiting, name="config_changes"),
    path("changes/<int:change_id>/", views_governance.config_change_detail, name="config_change"),
    path(
        "changes/<int:change_id>/decide/",
        views_governance.config_change_decide_view,
        name="config_change_decide",
    ),
    path("changes/tool/<str:name>/trail/", views_governance.tool_trail, name="tool_trail"),
    path("<slug:slug>/", views.task_detail, name="detail"),
    path("<slug:slug>/run/", views.task_run, name="run"),
    path("<slug:slug>/autonomy/", views.task_autonomy, name="autonomy"),
    path("<slug:slug>/changes/", views_governance.task_config_changes, name="changes"),
    path("autonomy/<int:change_id>/", views.autonomy_change_decide, name="autonomy_decide"),
]

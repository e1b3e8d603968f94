from django.urls import path

from tasks import views

app_name = "tasks"
urlpatterns = [
    path("", views.task_list, name="list"),
    path("<slug:slug>/", views.task_detail, name="detail"),
    path("<slug:slug>/run/", views.task_run, name="run"),
    path("<slug:slug>/autonomy/", views.task_autonomy, name="autonomy"),
    path("autonomy/<int:change_id>/", views.autonomy_change_decide, name="autonomy_decide"),
]

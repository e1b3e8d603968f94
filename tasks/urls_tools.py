from django.urls import path

from tasks import views

app_name = "tools"
urlpatterns = [
    path("", views.tool_list, name="list"),
    path("<str:name>/", views.tool_detail, name="detail"),
]

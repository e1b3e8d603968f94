from django.urls import path

from lineage import views

app_name = "lineage"
urlpatterns = [path("", views.run_lineage, name="run")]
